"""Nested values on the wire (core/structure.py, the codec's tagged records), without a runtime."""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import msgpack
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from actorgrad.core import codec, ops, structure
from actorgrad.core import messages as m
from actorgrad.errors import DecodeError

Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    tag: str = "out"


def tensors_to_slots(value):
    found = []

    def leaf(x, path):
        if isinstance(x, torch.Tensor):
            found.append(x)
            return m.Slot(len(found) - 1)
        raise TypeError(f"{path}: {type(x).__name__}")

    return structure.encode(value, leaf), found


def through_the_wire(tree):
    return codec.decode_frame(codec.Frame.from_bytes(codec.encode_frame(m.Ack(1, tree)).to_bytes())).data


@pytest.mark.parametrize("value", [
    (torch.ones(2), None, 3, "s"),
    {"a": [torch.ones(1), {"b": (torch.zeros(2), 1.5)}]},
    Point(torch.ones(1), Point(torch.zeros(1), None)),
    Output(torch.ones(2), torch.zeros(()), "x"),
    collections.OrderedDict(b=torch.ones(1), a=torch.zeros(1)),
    [slice(1, None, 2), Ellipsis, torch.float16],
])
def test_values_keep_structure_and_types_across_the_wire(value):
    wire, tensors = tensors_to_slots(value)
    back = structure.decode(through_the_wire(wire), lambda s: tensors[s.index], structure.TypeResolver())
    assert type(back) is type(value)
    flat_in, spec_in = torch.utils._pytree.tree_flatten(value, is_leaf=dataclasses.is_dataclass)
    flat_out, spec_out = torch.utils._pytree.tree_flatten(back, is_leaf=dataclasses.is_dataclass)
    assert spec_in == spec_out
    for a, b in zip(flat_in, flat_out):
        if isinstance(a, torch.Tensor):
            assert a is b
        elif dataclasses.is_dataclass(a):
            assert dataclasses.asdict(a).keys() == dataclasses.asdict(b).keys() and a.tag == b.tag
        else:
            assert a == b


def test_a_packed_sequence_is_rebuilt_as_one():
    packed = pack_padded_sequence(torch.randn(4, 2, 3), torch.tensor([4, 2]))
    wire, tensors = tensors_to_slots(packed)
    back = structure.decode(through_the_wire(wire), lambda s: tensors[s.index], structure.TypeResolver())
    assert isinstance(back, PackedSequence) and torch.equal(back.data, packed.data)
    assert torch.equal(back.batch_sizes, packed.batch_sizes)


def test_a_type_no_namespace_holds_is_rebuilt_with_its_fields():
    rec = m.Typed("namedtuple", "somewhere.else:Pair", ("left", "right"), (1, 2))
    back = structure.decode(rec, lambda s: s, structure.TypeResolver())
    assert back._fields == ("left", "right") and tuple(back) == (1, 2) and type(back).__name__ == "Pair"
    rec = m.Typed("dataclass", "somewhere.else:Out", ("a",), (3,))
    assert structure.decode(rec, lambda s: s, structure.TypeResolver()).a == 3
    with pytest.raises(TypeError, match="not known in this process"):
        structure.decode(m.Typed("pytree", "somewhere.else:Tree", None, ()), lambda s: s, structure.TypeResolver())


def test_unsendable_leaves_name_their_path():
    with pytest.raises(TypeError, match=r"\['k'\]\[1\]"):
        tensors_to_slots({"k": [torch.ones(1), object()]})
    with pytest.raises(TypeError, match="dictionary keys"):
        tensors_to_slots({(1, 2): torch.ones(1)})


def _tagged(items):
    return msgpack.ExtType(4, msgpack.packb(items))


@pytest.mark.parametrize("items, words", [
    (["T", "class", "m:C", None, []], "typed container"),
    (["T", "namedtuple", "m:C", ["a"], []], "name each"),
    (["T", "namedtuple", "m:C", ["not an identifier"], [1]], "name each"),
    (["O", 5, [], {}], "operation"),
    (["O", "torch.add", [], {1: 2}], "keyword names"),
    (["S", 1, "x", None], "slice"),
    (["D", "complex1024"], "invalid tagged"),
    (["?"], "invalid tagged"),
    ([], "starts with its tag"),
])
def test_malformed_tagged_records_are_refused(items, words):
    envelope = msgpack.packb([11, 1, _tagged(items)])
    with pytest.raises(DecodeError, match=words):
        codec.decode_frame(codec.Frame(envelope, [], True))


def test_only_tensor_operations_of_pytorch_may_run():
    assert ops.lookup("torch.Tensor.__add__") is not None and ops.lookup("torch.cat") is not None
    for name in ("torch.Tensor.add_", "torch.Tensor.__iadd__", "torch.Tensor.__setitem__", "torch.Tensor.backward",
                 "torch.Tensor.register_hook", "torch.Tensor.tolist", "torch.save", "torch.load", "os.system",
                 "builtins.eval"):
        assert ops.lookup(name) is None, name
    with pytest.raises(TypeError, match="may run on Nodes"):
        ops.evaluate(m.Op("builtins.eval", ("1",), {}), ("1",), {})
    with pytest.raises(TypeError, match="out="):
        ops.evaluate(m.Op("torch.add", (), {}), (torch.ones(1), 1), {"out": torch.empty(1)})
