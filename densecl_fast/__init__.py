"""densecl_fast: fast, faithful DenseCL pretraining."""
from .config import Config, ConfigError, load_config
from .model import DenseCL, DenseCLNeck

__all__ = ["Config", "ConfigError", "DenseCL", "DenseCLNeck", "load_config"]
__version__ = "0.1.0"
