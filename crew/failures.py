"""Why a broker connection or channel failed, in words: pika's close reasons and the
failures under its connection workflow (internal; :mod:`crew.amqp` raises crew's errors
with them)."""

from __future__ import annotations

import ssl

import pika.exceptions
from pika.adapters.utils.connection_workflow import (AMQPConnectionWorkflowFailed,
                                                     AMQPConnectorPhaseErrorBase)

__all__ = ["NOT_RETRYABLE", "describe", "describe_close", "root_cause"]


def describe_close(reason: BaseException | None) -> tuple[int, str]:
    """``(reply code, reply text)`` of a pika close reason."""
    if isinstance(reason, (pika.exceptions.ChannelClosed, pika.exceptions.ConnectionClosed)):
        return reason.reply_code, reason.reply_text
    return 0, repr(reason)


#: Connection failures that another attempt cannot mend.
NOT_RETRYABLE = (pika.exceptions.ProbableAuthenticationError,
                 pika.exceptions.ProbableAccessDeniedError, ssl.SSLCertVerificationError)


def root_cause(error: BaseException) -> BaseException:
    """The failure under pika's connection-workflow wrappers, whose own text is empty."""
    while True:
        if isinstance(error, AMQPConnectionWorkflowFailed) and error.exceptions:
            error = error.exceptions[-1]
        elif isinstance(error, AMQPConnectorPhaseErrorBase) and error.exception is not None:
            error = error.exception
        else:
            return error


def describe(error: BaseException) -> str:
    """``error`` as one line of text: its type, and its message if it has one."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    # pika's exception texts can carry nested reprs; keep it one line.
    return " ".join(text.split())[:500]
