"""``python -m master_example --port 8888``: serve the article's application until SIGTERM."""

import sys

from crew.cli import broker_from_options, setup_logging
from crew.httpapi import build_http_parser, run_http
from crew.master.tornado import Client

from . import make_app


def main() -> None:
    parser = build_http_parser("python -m master_example", default_port=8888,
                               description="The article's Tornado application over crew "
                                           "tasks (run python -m worker_example beside it).")
    options = parser.parse_args()
    setup_logging(options)
    try:
        client = Client(broker=broker_from_options(options, "crew-master-example"))
    except ValueError as exc:  # a bad URL or option: usage and status 2, not a traceback
        parser.error(str(exc))
    app = make_app(client)  # subscribes before connecting, as the article did at import time
    sys.exit(run_http(app, client, options))


if __name__ == "__main__":
    main()
