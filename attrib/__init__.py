"""attrib: record a PyTorch training trajectory, then attribute the model's behaviour to it."""

__version__ = "0.1.0"

from attrib.analyzer import analyze, evaluate
from attrib.analyzer.run import Run, open_run
from attrib.analyzer.sql import sql
from attrib.analyzer.trajectory import TrajectoryError
from attrib.recorder import Codec, Recorder, RecordingError
from attrib.recorder.policies import Factored, Full, Project, TopK
from attrib.schemas.projection import project

__all__ = ["Codec", "Factored", "Full", "Project", "Recorder", "RecordingError", "Run", "TopK",
           "TrajectoryError", "__version__", "analyze", "evaluate", "open_run", "project", "sql"]
