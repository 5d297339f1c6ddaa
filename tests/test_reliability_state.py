"""Checkpoints and initialisation: state_dict / torch.save / torch.load(weights_only=True)
round-trips reproduce outputs bit-exactly for every exported module (a module rebuilt with
a different seed must get ALL its randomness back from the checkpoint: random features,
whitening kernels); loading into a differently configured module fails naming the key and
both shapes; meta-device construction + ``to_empty`` + ``reset_parameters`` re-initialises
every parameter and buffer (caches included) and then matches a CPU-built module exactly.
"""

from __future__ import annotations

import io

import pytest
import torch
from reliability_cases import (
    OTHER,
    SMALL,
    encoder_config,
    module_case,
    module_classes,
    pair_id,
    pairs,
    reset_all,
    run_encoder,
)

from transformer_zoo import Encoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (two threads spin against each other on a loaded
    2-core machine and run these sizes up to 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _check_round_trip(build, run) -> None:
    torch.manual_seed(0)
    first = build().eval()
    expected = run(first)
    state = _round_trip(first.state_dict())
    for key, value in first.state_dict().items():
        assert torch.equal(state[key], value), key
    torch.manual_seed(1)  # anything random that is not in the checkpoint now differs
    second = build().eval()
    second.load_state_dict(state)
    assert torch.equal(run(second), expected)


@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_module_round_trip_is_bit_exact(cls):
    case = module_case(cls)  # unknown modules fail here, loudly
    _check_round_trip(lambda: case.build(SMALL), lambda m: case.run(m, SMALL))


@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_encoder_round_trip_is_bit_exact(pair):
    _check_round_trip(lambda: Encoder(encoder_config(*pair)), run_encoder)


@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_loading_into_a_differently_configured_module_fails_clearly(cls):
    case = module_case(cls)
    state = case.build(SMALL).state_dict()
    if not state:
        pytest.skip(f"{cls.__name__} has no state to mismatch")
    other = case.build(OTHER)
    with pytest.raises(RuntimeError) as err:
        other.load_state_dict(state)
    msg = str(err.value)
    assert type(other).__name__ in msg
    assert ("size mismatch for" in msg and "from checkpoint" in msg) or "key(s)" in msg, msg


def _poison(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))


@pytest.mark.cpu_only
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_meta_construction_to_empty_and_reset(pair):
    """Every parameter and buffer is re-initialised; then weights from a CPU-built twin give
    the same outputs (non-persistent caches rebuilt correctly, not left as garbage)."""
    config = encoder_config(*pair)
    with torch.device("meta"):
        enc = Encoder(config)
    assert all(p.is_meta for p in enc.parameters())
    enc.to_empty(device="cpu")
    _poison(enc)
    reset_all(enc)
    for name, t in [*enc.named_parameters(), *enc.named_buffers()]:
        assert torch.isfinite(t).all(), f"{name} was not re-initialised by reset_parameters"
    twin = Encoder(config)
    enc.load_state_dict(twin.state_dict())
    enc.eval(), twin.eval()
    assert torch.equal(run_encoder(enc), run_encoder(twin))


@pytest.mark.cpu_only
@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_meta_construction_of_every_module(cls):
    case = module_case(cls)
    with torch.device("meta"):
        module = (case.meta_build or case.build)(SMALL)
    module.to_empty(device="cpu")
    if case.initialised:
        _poison(module)
        reset_all(module)
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            assert torch.isfinite(t).all(), f"{name} was not re-initialised by reset_parameters"
    twin = case.build(SMALL)
    module.load_state_dict(twin.state_dict())
    module.eval(), twin.eval()
    assert torch.equal(case.run(module, SMALL), case.run(twin, SMALL))
