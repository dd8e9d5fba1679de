"""The timm zoo: every architecture timm registers in `vision_transformer.py` and `deit.py`,
built small (2 blocks, a 4 x 4 patch grid) with every parameter random, saved (a) as a bare
state dict and (b) with `timm.models.save_for_hf`; each loads into both frameworks, (a) with
`arch=` and the two sizes that differ from the registered ones stated, (b) with no hints, and
matches timm's own forward (float32 1e-5), or is refused with a message naming what is not
supported. Never a crash, never wrong logits."""

from __future__ import annotations

import pytest

timm = pytest.importorskip("timm")
pytest.importorskip("huggingface_hub")  # save_for_hf writes through it (no network)

from tests.helpers.zoo import run_zoo, summary  # noqa: E402

TARGET = 0.97  # of the architectures timm can build small, the share that must port both ways
# (174 of 179 today: the rest are differential attention and 384 px with 14 px patches).
# Architectures timm builds identically at the zoo's size are run once (helpers/zoo.twin_key):
# 122 of 179 run, 91 of the second zoo's 100.


@pytest.mark.slow
def test_the_timm_zoo_ports_or_is_refused(tmp_path, capsys):
    archs = sorted(
        set(timm.list_models(module="vision_transformer")) | set(timm.list_models(module="deit"))
    )
    table, twins = run_zoo(archs, tmp_path)
    with capsys.disabled():
        buildable, ported, bad = summary("timm zoo", table, twins)
    assert not bad, bad
    refused = {a: r for a, r in table.items() if r.startswith("refused")}
    assert len(ported) >= TARGET * len(buildable), f"{len(ported)} of {len(buildable)}: {refused}"


@pytest.mark.slow
def test_the_rope_and_relative_zoo_is_never_wrong(tmp_path, capsys):
    """timm's `eva.py` (EVA, EVA-02, DINOv3, PE, RoPE-ViT, sbb), `beit.py`,
    `vision_transformer_relpos.py` and `naflexvit.py`, the same way: what ports equals timm,
    the rest is refused by name. 0 wrong, 0 crashes, and at least 90% port (95 of 95 today,
    NaFlexVit's factorized tables included). The bare state dict with `arch=` only: the
    Hub folders of the models that port are tested through the presets (test_family,
    test_naflex), and the time is the suite's."""
    archs = sorted(
        set().union(
            *(
                timm.list_models(module=m)
                for m in ("eva", "beit", "vision_transformer_relpos", "naflexvit")
            )
        )
    )
    table, twins = run_zoo(archs, tmp_path, hub=False)
    with capsys.disabled():
        buildable, ported, bad = summary("RoPE and relative zoo", table, twins)
    assert not bad, bad
    refused = {a: r for a, r in table.items() if r.startswith("refused")}
    assert len(ported) >= 0.9 * len(buildable), f"{len(ported)} of {len(buildable)}: {refused}"
