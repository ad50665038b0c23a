"""Strategy versions: immutable, named by code and parameters, validated on upload."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from engine.signals.errors import StrategyVersionError
from engine.signals.versions import (
    MAX_SOURCE_BYTES,
    SHIPPED,
    StrategyVersion,
    code_sha256,
    new_version,
    verify,
)

SOURCE = "def strategy(candles, params):\n    return {'action': 'hold'}\n"


def _upload(source: str = SOURCE, author: str = "alice", created_ns: int = 1, **params: object):
    return new_version(source=source, parameters=params, author=author, created_ns=created_ns)


def test_the_code_hash_is_the_sha256_of_the_uploaded_source() -> None:
    version = _upload(period=14)
    assert version.code_sha256 == hashlib.sha256(SOURCE.encode()).hexdigest()
    assert version.source == SOURCE and version.shipped is None
    assert version.parameters == {"period": 14}
    assert version.author == "alice" and version.created_ns == 1


def test_the_same_code_and_parameters_are_the_same_version_whoever_uploads_them_when() -> None:
    first = _upload(period=14, level=30.5)
    again = _upload(author="bob", created_ns=99, level=30.5, period=14)
    assert again.version_id == first.version_id
    assert again.version_id.startswith("sv-") and len(again.version_id) == 27


def test_other_parameters_or_other_code_are_another_version() -> None:
    base = _upload(period=14)
    assert _upload(period=15).version_id != base.version_id
    assert _upload(period=14.0).version_id != base.version_id  # 14 and 14.0 are spelt apart
    assert _upload(SOURCE + "# tuned\n", period=14).version_id != base.version_id


def test_a_shipped_strategy_is_stored_with_every_parameter_so_defaults_name_one_version() -> None:
    bare = new_version(shipped="sma_cross", parameters={}, author="ops", created_ns=1)
    spelt = new_version(shipped="sma_cross", parameters={"fast": 10}, author="ops", created_ns=2)
    assert bare.version_id == spelt.version_id
    assert bare.parameters == {"fast": 10, "slow": 30, "sl_distance": None, "tp_distance": None}
    other = new_version(shipped="sma_cross", parameters={"fast": 5}, author="ops", created_ns=1)
    assert other.version_id != bare.version_id


def test_a_shipped_strategy_hash_covers_its_module_so_new_code_is_a_new_version() -> None:
    import inspect

    module_text = inspect.getsource(SHIPPED["rsi_reversal"].module)
    expected = hashlib.sha256(f"shipped:rsi_reversal\n{module_text}".encode()).hexdigest()
    assert code_sha256(shipped="rsi_reversal") == expected


@pytest.mark.parametrize(
    ("name", "parameters", "message"),
    [
        ("sma_cross", {"fast": 30, "slow": 10}, "fast (30) must be shorter than slow (10)"),
        ("sma_cross", {"fsat": 3}, "unknown field `fsat`"),
        ("rsi_reversal", {"period": 1}, "Expected `int` >= 2"),
        ("macd", {}, "unknown strategy 'macd' (known: rsi_reversal, sma_cross)"),
    ],
)
def test_shipped_parameters_are_checked_by_the_strategy_type(
    name: str, parameters: dict[str, object], message: str
) -> None:
    with pytest.raises(StrategyVersionError) as caught:
        new_version(shipped=name, parameters=parameters, author="ops", created_ns=1)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def strategy(candles, params)\n    pass\n", "not valid Python"),
        ("def run(candles, params):\n    pass\n", "define `def strategy(candles, params)`"),
        ("if True:\n    def strategy(candles, params):\n        pass\n", "at module level"),
        ("#" * (MAX_SOURCE_BYTES + 1), f"larger than {MAX_SOURCE_BYTES} bytes"),
    ],
)
def test_an_upload_that_cannot_run_is_refused_before_it_is_a_version(
    source: str, message: str
) -> None:
    with pytest.raises(StrategyVersionError) as caught:
        _upload(source)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"levels": [30, 70]}, "parameters.levels: a string, number, boolean or null, not list"),
        ({"stop": float("nan")}, "parameters.stop: not a finite number"),
        ({"9lives": 1}, "'9lives' is not a parameter name"),
        ({f"p{i}": i for i in range(65)}, "at most 64"),
        ({"note": "x" * 257}, "longer than 256"),
    ],
)
def test_uploaded_parameters_are_json_scalars_with_names(
    parameters: dict[str, object], message: str
) -> None:
    with pytest.raises(StrategyVersionError) as caught:
        new_version(source=SOURCE, parameters=parameters, author="alice", created_ns=1)
    assert message in str(caught.value)


def test_an_upload_needs_an_author_and_exactly_one_kind_of_code() -> None:
    with pytest.raises(StrategyVersionError, match="author"):
        _upload(author="")
    with pytest.raises(StrategyVersionError, match="either uploaded source or a shipped name"):
        new_version(source=SOURCE, shipped="sma_cross", parameters={}, author="a", created_ns=1)
    with pytest.raises(StrategyVersionError, match="either uploaded source or a shipped name"):
        new_version(parameters={}, author="a", created_ns=1)


def test_a_version_is_immutable() -> None:
    version = _upload(period=14)
    with pytest.raises(AttributeError):
        version.source = "import os"  # type: ignore[misc]


def test_a_stored_version_round_trips_and_an_edited_one_is_refused() -> None:
    version = _upload(period=14)
    stored = msgspec.json.encode(version)
    assert verify(msgspec.json.decode(stored, type=StrategyVersion)) == version
    edited_code = msgspec.structs.replace(version, source=SOURCE + "import socket\n")
    with pytest.raises(StrategyVersionError, match="code does not match its sha256"):
        verify(edited_code)
    edited_params = msgspec.structs.replace(version, parameters={"period": 2})
    with pytest.raises(StrategyVersionError, match="id does not match"):
        verify(edited_params)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(stored[:-1] + b',"extra":1}', type=StrategyVersion)


# ------------------------------------------------ the server-free core the API uses for uploads


def test_an_upload_made_by_the_core_is_the_version_the_signals_service_makes() -> None:
    from engine.core.strategy_versions import uploaded_version

    parameters = {"period": 14, "level": 30.5, "on": True, "name": "x", "none": None}
    core = uploaded_version(source=SOURCE, parameters=parameters, author="alice", created_ns=1)
    assert core == _upload(**parameters)
    # Pinned: the id an upload had before the core existed; stored ids stay valid.
    assert core.version_id == "sv-7b92997a64cbd939bb8f0f1c"
    shipped = new_version(shipped="sma_cross", parameters={}, author="ops", created_ns=1)
    assert shipped.parameters["fast"] == 10 and verify(shipped) is shipped


def test_the_core_refuses_what_the_signals_service_refuses() -> None:
    from engine.core.strategy_versions import uploaded_version, verify_uploaded

    with pytest.raises(StrategyVersionError, match="define `def strategy"):
        uploaded_version(source="x = 1\n", parameters={}, author="a", created_ns=1)
    with pytest.raises(StrategyVersionError, match="not a parameter name"):
        uploaded_version(source=SOURCE, parameters={"1x": 1}, author="a", created_ns=1)
    version = _upload(period=14)
    assert verify_uploaded(version) is version
    edited = msgspec.structs.replace(version, source=SOURCE + "import os\n")
    with pytest.raises(StrategyVersionError, match="code does not match"):
        verify_uploaded(edited)
    renamed = msgspec.structs.replace(version, parameters={"period": 15})
    with pytest.raises(StrategyVersionError, match="id does not match"):
        verify_uploaded(renamed)
    # A shipped version's hash covers module text the core does not have: never vouched for.
    shipped = new_version(shipped="rsi_reversal", parameters={}, author="ops", created_ns=1)
    with pytest.raises(StrategyVersionError, match="verified by the signals service"):
        verify_uploaded(shipped)


def test_the_core_accepts_uploads_without_importing_the_signals_service() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from engine.core.strategy_versions import uploaded_version\n"
        "v = uploaded_version(source='def strategy(c, p):\\n    pass\\n', parameters={},"
        " author='a', created_ns=1)\n"
        "assert not [m for m in sys.modules if m.startswith('engine.signals')], sys.modules\n"
        "print(v.version_id)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("sv-")


def test_the_old_import_paths_of_the_wire_types_still_work() -> None:
    import schemas.signals as wire
    from engine.signals import candles, config, messages, sandbox, strategy, versions

    assert candles.Timeframe is wire.Timeframe
    assert strategy.Signal is wire.Signal and strategy.SignalAction is wire.SignalAction
    assert sandbox.FailureKind is wire.FailureKind
    assert versions.StrategyVersion is StrategyVersion is wire.StrategyVersion
    assert config.StrategyDeployment is wire.StrategyDeployment
    assert messages.StrategySignal is wire.StrategySignal
    assert messages.StrategyRunFailed is wire.StrategyRunFailed
    from engine.core.errors import StrategyVersionError as core_error

    assert StrategyVersionError is core_error
