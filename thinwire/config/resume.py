"""Moved to :mod:`thinwire.trainer.resume_config` (the trainer checks a resume; ``config``
only assembles). Kept so that ``thinwire.config.resume`` imports keep working."""
from ..trainer.resume_config import (SAFE_TO_CHANGE, ResumeConfigError, as_dict, changes,  # noqa: F401
                                     check_decay_branch, check_resume_config, config_changes, describe_changes,
                                     flatten, is_safe)
