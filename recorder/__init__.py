"""Training-time side: hooks that record the trajectory into a run directory."""

from attrib.recorder.recorder import Recorder
from attrib.recorder.store import Codec
from attrib.recorder.writer import RecordingError

__all__ = ["Codec", "Recorder", "RecordingError"]
