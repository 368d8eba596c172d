"""Opting submodules in: wrap_in_hpu_graph, ModuleCacher and wrap_submodules, against the
seed documents' ModuleCacher examples."""

from __future__ import annotations

import copy
import inspect
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpuopt


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, scale: float = 1.0, act: str = "gelu", bias=None):
        h = self.norm(self.lin(x)) * scale
        h = F.gelu(h) if act == "gelu" else torch.relu(h)
        return h if bias is None else h + bias


def test_wrap_keeps_class_state_dict_and_is_reversible():
    block = Block()
    keys = list(block.state_dict())
    out = hpuopt.wrap_in_hpu_graph(block)
    assert out is block and hpuopt.is_wrapped(block)
    assert type(block) is Block and Block.forward is not block.forward  # the class is untouched
    assert list(block.state_dict()) == keys
    assert isinstance(block.forward, hpuopt.GraphedForward)
    with pytest.raises(hpuopt.InputError, match="already wrapped"):
        hpuopt.wrap_in_hpu_graph(block)
    assert hpuopt.unwrap(block) == [""]
    assert not hpuopt.is_wrapped(block)


def test_changing_shapes_kwargs_and_non_tensor_args():
    block = Block()
    ref = copy.deepcopy(block)
    hpuopt.wrap_in_hpu_graph(block, max_graphs=4)
    with torch.no_grad():
        for batch, scale, act in [(4, 1.0, "gelu"), (4, 1.0, "gelu"), (7, 2.0, "relu"), (3, 0.5, "gelu")]:
            x = torch.randn(batch, 16)
            bias = torch.randn(16) if batch == 7 else None
            torch.testing.assert_close(
                block(x, scale=scale, act=act, bias=bias), ref(x, scale=scale, act=act, bias=bias)
            )
    stats = block.forward.stats()
    assert stats["graphs"] >= 2 and stats["replays"] >= 4 and stats["hits"] >= 1


def test_bypass_for_one_call_and_clear():
    block = Block()
    hpuopt.wrap_in_hpu_graph(block)
    x = torch.randn(2, 16)
    with torch.no_grad():
        block(x)
        before = block.forward.stats()["replays"]
        torch.testing.assert_close(block(x, bypass_hpu_graphs=True), block.forward.original(x))
        assert block.forward.stats()["replays"] == before  # the bypassed call replayed nothing
        block.forward.clear()
        assert block.forward.stats()["graphs"] == 0
        block(x)
        assert block.forward.stats()["graphs"] == 1


def test_module_cacher_training_loop_matches_eager():
    """Seed 003's ModuleCacher training loop, with a smaller last batch."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    ref = copy.deepcopy(model)
    hpuopt.ModuleCacher(max_graphs=10)(model=model, inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for batch in (32, 32, 32, 11):
        data, target = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            F.nll_loss(F.log_softmax(m(data), 1), target).backward()
            o.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)
    assert model.forward.stats()["replays"] >= 4


def test_module_cacher_not_inplace_leaves_model_alone():
    block = Block()
    wrapped = hpuopt.ModuleCacher(max_graphs=2)(model=block, inplace=False)
    assert wrapped is not block and not hpuopt.is_wrapped(block) and hpuopt.is_wrapped(wrapped)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), block(x))


def test_seed_dynamic_op_between_two_module_cachers():
    """Seed 003: module1 -> t[torch.where(t > 0)] -> module2, each module opted in."""
    module1, module2 = nn.Linear(10, 3), nn.ReLU()
    ref1 = copy.deepcopy(module1)
    hpuopt.ModuleCacher(max_graphs=10)(model=module1, inplace=True)
    hpuopt.ModuleCacher(max_graphs=10)(model=module2, inplace=True)
    opt = torch.optim.Adadelta(itertools.chain(module1.parameters(), module2.parameters()), lr=0.1)
    ref_opt = torch.optim.Adadelta(ref1.parameters(), lr=0.1)
    for _ in range(6):
        data = torch.randn(5, 10)
        target = data.mean()
        losses = []
        for m1, m2, o in ((module1, module2, opt), (ref1, nn.ReLU(), ref_opt)):
            o.zero_grad(set_to_none=True)
            tmp = m1(data)
            tmp = tmp[torch.where(tmp > 0)]
            tmp = m2(tmp)
            loss = torch.abs(tmp.mean() - target)
            if not torch.isnan(loss):
                loss.backward()
                o.step()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], equal_nan=True)
        for p, q in zip(module1.parameters(), ref1.parameters()):
            torch.testing.assert_close(p, q)


def test_wrap_submodules_by_name_and_type():
    class Pipe(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = nn.Sequential(Block(), Block())
            self.vae = nn.Module()
            self.vae.decoder = nn.Linear(16, 8)
            self.vae.encoder = nn.Linear(8, 16)
            self.head = Block()

        def forward(self, x):
            return self.vae.decoder(self.head(self.unet(self.vae.encoder(x))))

    pipe = Pipe()
    ref = copy.deepcopy(pipe)
    names = hpuopt.wrap_submodules(pipe, names=["unet", "vae.decoder"], types=(Block,))
    assert names == ["unet", "vae.decoder", "head"]  # unet's own Blocks are inside unet
    assert not hpuopt.is_wrapped(pipe.vae.encoder)
    with torch.no_grad():
        for batch in (2, 2, 5):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(pipe(x), ref(x))
    with pytest.raises(hpuopt.InputError, match="no submodule 'vae.nope'.*vae.decoder"):
        hpuopt.wrap_submodules(pipe, names=["vae.nope"])
    assert sorted(hpuopt.unwrap(pipe)) == ["head", "unet", "vae.decoder"]


def test_wrap_rejects_non_modules_and_bad_options():
    with pytest.raises(hpuopt.InputError, match="nn.Module"):
        hpuopt.wrap_in_hpu_graph(lambda x: x)
    with pytest.raises(hpuopt.ConfigError, match="max_graph"):
        hpuopt.ModuleCacher(max_graph=3)


class _Keywords(torch.nn.Module):
    """A forward whose parameters a library might look for."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, scale: float = 1.0):
        """Projects the inputs."""
        h = self.proj(input_ids) * scale
        if position_ids is not None:
            h = h + position_ids.unsqueeze(-1).to(h.dtype)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return h


def _builds_position_ids(module, mask):
    """What transformers' generate() does: position ids only if forward takes them."""
    if "position_ids" in inspect.signature(module.forward).parameters:
        return (mask.cumsum(-1) - 1).clamp(min=0)
    return None


@pytest.mark.parametrize("how", ["wrap_in_hpu_graph", "ModuleCacher", "wrap_submodules"])
def test_wrapped_forward_keeps_its_signature_name_and_docstring(how):
    model = _Keywords()
    before = inspect.signature(model.forward)
    if how == "wrap_in_hpu_graph":
        hpuopt.wrap_in_hpu_graph(model)
        target = model
    elif how == "ModuleCacher":
        target = hpuopt.ModuleCacher(max_graphs=4)(model=model, inplace=True)
    else:
        outer = torch.nn.Sequential(model)
        hpuopt.wrap_submodules(outer, names=["0"])
        target = outer[0]
    assert hpuopt.is_wrapped(target)
    assert inspect.signature(target.forward) == before
    assert target.forward.__name__ == "forward"
    assert target.forward.__doc__ == "Projects the inputs."
    x = torch.randn(2, 5, 8)
    mask = (torch.rand(2, 5) > 0.3).to(torch.float32)
    pos = _builds_position_ids(target, mask)
    assert pos is not None  # the library still sees position_ids
    with torch.no_grad():
        torch.testing.assert_close(
            target(x, attention_mask=mask, position_ids=pos, scale=0.5),
            target.forward.bypass(x, attention_mask=mask, position_ids=pos, scale=0.5),
        )
