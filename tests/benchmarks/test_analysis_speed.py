"""benchmarks/analysis_speed.py: its fvcore sample covers the whole resolution grid."""

from __future__ import annotations

from tests.scripts import load_script

speed = load_script("benchmarks/analysis_speed.py")


def test_the_fvcore_sample_spreads_over_every_height_and_width():
    resolutions = speed.sweep_resolutions(8)
    sample = speed.spread_sample(resolutions, 10)
    assert len(sample) == 10 and sample[0] == resolutions[0] and sample[-1] == resolutions[-1]
    heights = {h for h, _ in sample}
    widths = {w for _, w in sample}
    assert len(heights) >= 5 and len(widths) >= 5  # resolutions[::100] had one height
    every = sum(h * w for h, w in resolutions) / len(resolutions)
    sampled = sum(h * w for h, w in sample) / len(sample)
    assert abs(sampled - every) / every < 0.15  # not biased towards small inputs
    assert speed.spread_sample(resolutions, 1000) == resolutions


def test_model_entries_name_their_settings_and_resolution():
    assert speed.model_and_side("torchvision:deeplabv3_resnet101@520") == (
        "torchvision:deeplabv3_resnet101", {}, 520
    )
    assert speed.model_and_side("unet") == ("unet", {}, 32)
    assert speed.model_and_side("unet,NF=64,K=5") == ("unet", {"NF": 64, "K": 5}, 32)
    assert speed.model_and_side("timm:resnet18") == ("timm:resnet18", {}, 224)
    assert speed.model_and_side("torchvision:vit_h_14,image_size=518@518") == (
        "torchvision:vit_h_14", {"image_size": 518}, 518
    )


def test_the_report_says_threads_and_load():
    result = {
        "date": "d", "machine": "m", "torch_threads": 1, "torch": "t", "python": "p",
        "command": "c", "seconds_total": 1.0,
        "load_average_1min": {"before": 0.5, "after": 0.7},
        "models": [{"model": "x", "error": "ValueError: no"}], "sweep": None,
        "startup_seconds_median": {"convtally --help": 0.06},
    }
    text = speed.markdown(result)
    assert "1 torch thread(s), 1-minute load average 0.5 before and 0.7 after" in text
    assert "failed: ValueError: no" in text and "`convtally --help` | 0.060" in text


def test_the_report_gives_the_export_rungs_floor_beside_its_time():
    row = {
        "model": "timm:m", "resolution": "224x224", "capture": "export", "rounds": 1,
        "seconds_median": {"built": 6.0, "by_name": 6.5, "fvcore": 1.0, "torch_export": 5.0},
        "seconds_first": {"built": 6.0, "by_name": 6.5, "fvcore": 1.0},
        "ratio_built_to_fvcore": 6.0, "ratio_by_name_to_fvcore": 6.5,
        "ratio_torch_export_to_fvcore": 5.0,
    }
    lines = speed.summary_lines([row])
    assert lines[0].startswith("- export: 1 models, built at most 3x fvcore's time: 0 of 1")
    assert "torch.export alone" in lines[1] and "median 5.00, least 5.00, most 5.00" in lines[1]
    text = speed.markdown({
        "date": "d", "machine": "m", "torch_threads": 1, "torch": "t", "python": "p",
        "command": "c", "seconds_total": 1.0, "load_average_1min": {"before": 0, "after": 0},
        "models": [row], "sweep": None, "startup_seconds_median": {},
    })
    assert "| timm:m | 5.000 | 1.000 | 5.00 | 6.00 |" in text
