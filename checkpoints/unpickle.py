"""Reading the reference's pickled Lightning checkpoints without executing them.

Those files pickle OmegaConf and tokenizer objects, so they cannot be read with
`weights_only=True`, and `weights_only=False` would run whatever the file says. Here torch's
zip archive is read with an unpickler that resolves only torch's tensor rebuilders and types,
collections and numpy reconstructors, and turns every other global into an inert `PickleStub`.
"""

from __future__ import annotations

import pickle
import zipfile

import torch

_TORCH_REBUILDERS = {
    "torch._utils": {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_sparse_tensor",
        "_rebuild_nested_tensor",
        "_rebuild_qtensor",
    },
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch.nn.parameter": {"Parameter"},
    "torch.storage": {"TypedStorage", "UntypedStorage"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict", "Counter", "defaultdict", "deque"},
    "builtins": {"set", "frozenset", "bytearray", "complex", "slice", "range"},
    "_codecs": {"encode"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
}


def _allowed(module: str, name: str) -> bool:
    if name in _TORCH_REBUILDERS.get(module, ()):
        return True
    if module == "torch":  # dtypes, storage / tensor type classes, Size, device
        obj = getattr(torch, name, None)
        return (
            isinstance(obj, torch.dtype)
            or name in ("Size", "device", "Tensor")
            or (isinstance(obj, type) and name.endswith(("Storage", "Tensor")))
        )
    return module == "numpy.dtypes" and name.endswith("DType")


class PickleStub:
    """Stands in for a global the restricted unpickler does not resolve. Calling, constructing
    or restoring it only records the arguments; no code from the file runs."""

    stub_module = ""
    stub_name = ""

    def __init__(self, *args, **kwargs):
        self.stub_args = args
        self.stub_kwargs = kwargs
        self.stub_state = None

    def __setstate__(self, state):
        self.stub_state = state

    def __repr__(self) -> str:
        return f"<stub {self.stub_module}.{self.stub_name}>"


def _stub_class(module: str, name: str) -> type:
    return type(name, (PickleStub,), {"stub_module": module, "stub_name": name})


class RestrictedUnpickler(pickle.Unpickler):
    """find_class resolves only torch / collections / numpy rebuild globals; everything else
    (OmegaConf, tokenizers, and e.g. os.system) becomes an inert `PickleStub` subclass."""

    def __init__(self, file, persistent_load):
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        if _allowed(module, name):
            return super().find_class(module, name)
        return _stub_class(module, name)

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def restricted_load(path: str):
    """torch.save's zip format read without torch.load: storages from the archive, the pickle
    through `RestrictedUnpickler`, tensors on CPU."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pickles:
            raise pickle.UnpicklingError("no data.pkl in the archive")
        prefix = pickles[0][: -len("data.pkl")]
        storages: dict[str, torch.storage.TypedStorage] = {}

        def load_storage(pid):
            if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
                raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
            _, storage_type, key, _location, numel = pid
            if storage_type is torch.UntypedStorage:
                dtype = torch.uint8
            elif isinstance(storage_type, type) and issubclass(storage_type, PickleStub):
                raise pickle.UnpicklingError(f"storage type {storage_type.stub_name} refused")
            else:
                dtype = storage_type._dtype  # .dtype warns that TypedStorage is deprecated
            if key not in storages:
                raw = archive.read(f"{prefix}data/{key}")
                nbytes = numel * torch._utils._element_size(dtype)
                if len(raw) != nbytes:
                    raise pickle.UnpicklingError(f"storage {key}: {len(raw)} != {nbytes} bytes")
                data = (
                    torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                    if raw
                    else torch.empty(0, dtype=torch.uint8)
                )
                storages[key] = torch.storage.TypedStorage(
                    wrap_storage=data.untyped_storage(), dtype=dtype, _internal=True
                )
            return storages[key]

        with archive.open(pickles[0]) as f:
            return RestrictedUnpickler(f, load_storage).load()


def stub_to_plain(obj, depth: int = 0):
    """Best effort: pickled OmegaConf containers (stubs with `_content`) and value nodes (`_val`)
    -> plain dicts, lists and values. Anything else is returned as is."""
    if depth > 50:
        return None
    if isinstance(obj, PickleStub):
        state = obj.stub_state
        if isinstance(state, dict):
            if "_content" in state:
                return stub_to_plain(state["_content"], depth + 1)
            if "_val" in state:
                return stub_to_plain(state["_val"], depth + 1)
        return obj
    if isinstance(obj, dict):
        return {k: stub_to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [stub_to_plain(v, depth + 1) for v in obj]
    return obj
