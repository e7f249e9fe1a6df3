"""The restricted unpickler: malicious pickles, tampered records, unsupported dtypes, sizes."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_jax.runtime.errors import UserError
from resnet_jax.weights import torch_pickle
from resnet_jax.weights.torch_format import load_torch_state_dict
from tests.helpers import OldStorage, OldTensor, write_legacy, write_old_legacy, write_zip


def test_old_rebuild_tensor_and_storage_views(tmp_path):
    data = np.arange(10, dtype=np.float32)
    root = OldStorage("root", 10)
    view = OldStorage("root", 10, view=("view", 2, 5))  # elements 2..6 of root
    obj = collections.OrderedDict(
        whole=OldTensor(root, 0, (2, 5), (5, 1)), part=OldTensor(view, 1, (2, 2), (2, 1))
    )
    write_old_legacy(tmp_path / "old.pth", obj, {"root": data})
    loaded = load_torch_state_dict(tmp_path / "old.pth")
    np.testing.assert_array_equal(loaded["whole"], data.reshape(2, 5))
    np.testing.assert_array_equal(loaded["part"], data[3:7].reshape(2, 2))


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    obj = {"w": OldTensor(OldStorage("root", 4), 2, (3,), (1,))}
    write_old_legacy(tmp_path / "bad.pth", obj, {"root": np.zeros(4, np.float32)})
    with pytest.raises(UserError, match="damaged"):
        load_torch_state_dict(tmp_path / "bad.pth")


class Evil:
    """Unpickling this with plain pickle runs `func(arg)`."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def evil_payloads(marker: Path) -> dict[str, tuple[object, str]]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (Evil(os.system, f"touch {marker}"), r"posix\.system"),
        "builtins.eval": (Evil(eval, touch), r"builtin\w*\.eval"),  # __builtin__ in protocol 2
        "builtins.exec": (Evil(exec, touch), r"builtin\w*\.exec"),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec"])
@pytest.mark.parametrize("container", ["zip", "legacy", "legacy_header"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, payload, container):
    marker = tmp_path / "pwned"
    evil, name_in_message = evil_payloads(marker)[payload]
    protocol = pickle.HIGHEST_PROTOCOL if container == "zip" else 2  # STACK_GLOBAL and GLOBAL
    pickled = pickle.dumps({"conv1.weight": evil}, protocol=protocol)
    # The payload is live: plain pickle would create the marker.
    pickle.loads(pickled)
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pth"
    if container == "zip":
        write_zip(path, pickled)
    else:
        write_legacy(path, pickled, in_header=container == "legacy_header")
    with pytest.raises(UserError, match=name_in_message) as error:
        load_torch_state_dict(path)
    assert "state_dict()" in str(error.value)
    assert not marker.exists()


def test_pickle_cannot_rewrite_a_tensor_record(tmp_path):
    class TamperedTensor(OldTensor):
        def __reduce__(self):  # a third item makes pickle run BUILD on the rebuilt tensor record
            return torch._utils._rebuild_tensor_v2, self.args, {"stride": (-1,), "offset": 3}

    obj = {"w": TamperedTensor(OldStorage("root", 4), 0, (4,), (1,), False, {})}
    write_old_legacy(tmp_path / "bad.pth", obj, {"root": np.zeros(4, np.float32)})
    with pytest.raises(UserError, match="damaged.*set the state"):
        load_torch_state_dict(tmp_path / "bad.pth")


def test_whole_model_pickle_names_the_class(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")
    with pytest.raises(UserError, match="torch.nn.modules.linear.Linear"):
        load_torch_state_dict(tmp_path / "model.pth")


@pytest.mark.parametrize(
    "size, stride, storage_numel, message",
    [
        ((1000,), (0,), 1, "stride 0"),  # one value repeated
        ((3 * 2**28,), (0,), 1, "more than any supported ResNet needs"),  # the 633-byte file
        ((2**26 + 1,), (1,), 2**26 + 1, "more than any supported ResNet needs"),
        ((100, 100), (1, 1), 200, "damaged.*overlaps"),  # 10,000 elements from 200
    ],
    ids=["stride0", "declared_huge", "over_cap", "overlapping"],
)
def test_tensors_larger_than_their_bytes_are_refused_before_reading(
    tmp_path, size, stride, storage_numel, message
):
    # The storage really holds one element, so nothing large is ever read, even on failure.
    obj = {"w": OldTensor(OldStorage("root", storage_numel), 0, size, stride)}
    write_old_legacy(tmp_path / "bad.pth", obj, {"root": np.zeros(1, np.float32)})
    with pytest.raises(UserError, match=message):
        load_torch_state_dict(tmp_path / "bad.pth")


@pytest.mark.parametrize("dtype", [torch.uint16, torch.complex64, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_unsupported_dtypes_are_named(tmp_path, dtype, legacy):
    tensors = {"w": torch.zeros(2, dtype=dtype)}
    torch.save(tensors, tmp_path / "w.pth", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UserError, match="type (uint16|ComplexFloat|float8_e4m3fn)") as error:
        load_torch_state_dict(tmp_path / "w.pth")
    assert "never needs" not in str(error.value)


def test_pickle_cannot_change_the_functions_it_is_allowed_to_call(tmp_path):
    # GLOBAL _rebuild_tensor_v2, then BUILD with a state that sets attributes on it: as
    # (None, slot state), which pickle applies with setattr, or as a plain __dict__ update.
    for name, state in (("slots", (None, {"__qualname__": "hacked"})), ("dict", {"x": 1})):
        body = pickle.dumps(state, protocol=2)[2:-1]  # without PROTO and STOP
        pickled = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + body + b"b."
        write_zip(tmp_path / f"{name}.pth", pickled)
        with pytest.raises(UserError, match="damaged.*set the state"):
            load_torch_state_dict(tmp_path / f"{name}.pth")
    assert torch_pickle._rebuild_tensor.__qualname__ == "_rebuild_tensor"
    assert torch_pickle._rebuild_tensor.__dict__ == {}
