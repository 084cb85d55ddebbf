"""engine=fsdp2's Distributed Checkpoint reader (``thinwire.trainer.fsdp2_shards.safe_reader``):
DCP reads ``.metadata`` with plain pickle, so thinwire's reader allows only DCP's metadata
classes, torch dtypes, paths and members of DCP's own enums; anything else is refused with one
line and nothing runs."""
import io
import os
import pickle

import pytest


class Crafted:
    def __reduce__(self):
        return (os.system, ("echo crafted > /dev/null",))


def test_crafted_dcp_metadata_is_refused(tmp_path):
    """DCP reads .metadata with plain pickle; thinwire's reader allows only DCP's metadata
    classes, torch dtypes and paths: a crafted file is refused with one line, nothing runs."""
    from thinwire.trainer.fsdp2_shards import UnsafeDCPError, safe_reader

    with open(tmp_path / ".metadata", "wb") as fh:
        pickle.dump(Crafted(), fh, protocol=5)
    with pytest.raises(UnsafeDCPError, match="would call posix.system|would call os.system"):
        safe_reader(str(tmp_path)).read_metadata()


class EnumByGetattr:  # how some Pythons (Debian 12's 3.11.2) pickle an enum member
    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return (getattr, (self.cls, self.name))


def test_dcp_enum_pickled_by_getattr_loads_and_other_getattr_is_refused(tmp_path):
    """An enum member pickled as getattr(Enum, name) (DCP's _MEM_FORMAT_ENCODING under some
    Pythons) loads; getattr on anything else (a path's unlink) is refused, nothing runs."""
    from pathlib import PosixPath

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from thinwire.trainer.fsdp2_shards import UnsafeDCPError, _MetadataUnpickler

    member = next(iter(_MEM_FORMAT_ENCODING))
    blob = pickle.dumps([EnumByGetattr(_MEM_FORMAT_ENCODING, member.name)], protocol=5)
    assert _MetadataUnpickler(io.BytesIO(blob)).load() == [member]
    for cls, name in [(PosixPath, "unlink"), (_MEM_FORMAT_ENCODING, "__class__")]:
        blob = pickle.dumps(EnumByGetattr(cls, name), protocol=5)
        with pytest.raises(UnsafeDCPError, match="only members of DCP's own enums"):
            _MetadataUnpickler(io.BytesIO(blob)).load()
