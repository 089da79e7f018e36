"""``from crew.master.tornado import Client``: the article's import path for the client.

The client is plain asyncio and runs inside Tornado 6 (which runs on asyncio) as it does in
any other asyncio program; this module only re-exports it.
"""

from ..client import Client, Parallel

__all__ = ["Client", "Parallel"]
