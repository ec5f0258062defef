"""The error of the wire protocol: a stable code and a message saying what to change."""

from __future__ import annotations


class ProtocolError(Exception):
    """A frame, join or filter we cannot accept.

    ``code`` is stable (``MalformedFrame``, ``UnsupportedVsn``, ``BinaryFrameUnsupported``,
    ``UnsupportedBinaryKind``, ``BinaryPayloadUnsupported``, ``UnencodableMessage``,
    ``TopicNameRequired``, ``UnmatchedTopic``, ``InvalidJoinPayload``, ``UnknownTable``,
    ``InvalidFilter``); ``message`` says what to change. ``reason`` is the
    ``"Code: message"`` text of an error join reply, as upstream writes it.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.message}"
