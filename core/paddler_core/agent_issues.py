"""Every agent-issue variant an agent reports, in one place (no I/O).

An issue travels as ``{"Variant": {params}}`` (:class:`paddler_core.protocol.AgentIssue`,
whose ``variant`` stays a plain string so an agent of another version is still read).
Where Paddler 4.1 has the variant, the name is Paddler's, with its ``{"model_path": ...}``
params (plus our ``message`` for people); the others are this implementation's own and
say so below.
"""

from __future__ import annotations

from enum import StrEnum


class AgentIssueVariant(StrEnum):
    # ---- the model file, on the agent's disk ----
    MODEL_FILE_DOES_NOT_EXIST = "ModelFileDoesNotExist"
    MODEL_CANNOT_BE_LOADED = "ModelCannotBeLoaded"
    """A file that is there but unusable (unreadable, not GGUF, refused by llama.cpp):
    Paddler has one variant for all of it; the ``message`` says which."""
    MODEL_CHECKSUM_MISMATCH = "ModelChecksumMismatch"
    MODEL_SOURCE_IS_NONE = "ModelSourceIsNone"
    MODEL_SOURCE_NOT_ALLOWED = "ModelSourceNotAllowed"
    """Ours: a source outside the agent's ``--model-url-allow`` / local roots."""
    MULTIMODAL_PROJECTION_CANNOT_BE_LOADED = "MultimodalProjectionCannotBeLoaded"
    """A ``multimodal_projection`` that cannot be resolved or loaded: the model serves
    text, image requests are refused."""

    # ---- downloads (URL, Hugging Face) ----
    MODEL_DOES_NOT_EXIST_AT_URL = "ModelDoesNotExistAtUrl"
    DOWNLOAD_SERVER_DENIED_ACCESS = "DownloadServerDeniedAccess"
    DOWNLOAD_SERVER_ERRORED = "DownloadServerErrored"
    DOWNLOAD_SERVER_IS_UNREACHABLE = "DownloadServerIsUnreachable"
    DOWNLOAD_SERVER_REJECTED_REQUEST = "DownloadServerRejectedRequest"
    DOWNLOAD_URL_IS_MALFORMED = "DownloadUrlIsMalformed"
    DOWNLOAD_INTERRUPTED = "DownloadInterrupted"
    CACHE_DIRECTORY_IS_NOT_WRITABLE = "CacheDirectoryIsNotWritable"
    HUGGINGFACE_MODEL_DOES_NOT_EXIST = "HuggingFaceModelDoesNotExist"
    HUGGINGFACE_PERMISSIONS = "HuggingFacePermissions"
    MODEL_DOWNLOAD_FAILED = "ModelDownloadFailed"
    """Ours: a Hugging Face download failure Paddler has no closer name for."""

    # ---- applying the desired state ----
    CHAT_TEMPLATE_DOES_NOT_COMPILE = "ChatTemplateDoesNotCompile"
    SLOT_CANNOT_START = "SlotCannotStart"
    INVALID_DESIRED_STATE = "InvalidDesiredState"
    """Ours: a desired state this agent refuses (out of its bounds)."""
    STATE_APPLICATION_FAILED = "StateApplicationFailed"
    """Ours: applying the state raised something unforeseen (a bug); the message says what."""
    DECODE_LOOP_STOPPED = "DecodeLoopStopped"
    """Ours: the inference loop died (a bug): nothing is served until a new state reloads."""

    # ---- engine: llama-server (ours) ----
    LLAMA_SERVER_UNREACHABLE = "LlamaServerUnreachable"
    LLAMA_SERVER_NOT_READY = "LlamaServerNotReady"
    MODEL_NOT_APPLICABLE_TO_LLAMA_SERVER = "ModelNotApplicableToLlamaServer"
