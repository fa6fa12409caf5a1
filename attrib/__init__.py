"""attrib: record a PyTorch training trajectory, then attribute the model's behaviour to it."""

__version__ = "0.1.0"

from attrib.analyzer.run import Run, open_run
from attrib.analyzer.sql import sql
from attrib.recorder import Codec, Recorder, RecordingError

__all__ = ["Codec", "Recorder", "RecordingError", "Run", "__version__", "open_run", "sql"]
