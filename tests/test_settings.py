"""TrainSettings: every value type-checked once, derived defaults, and what resuming may change."""

import math

import pytest

from gpt_fn.settings import SettingsError, TrainSettings, resume_settings


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"compile": "no"}, "compile must be true or false or null, got 'no'"),
        ({"max_steps": "2"}, "max_steps must be an int, got '2'"),
        ({"max_steps": 2.5}, "max_steps must be an int, got 2.5"),
        ({"max_steps": True}, "max_steps must be an int, got True"),
        ({"lr": "1e-3"}, "lr must be a number, got '1e-3'"),
        ({"dtype": "float8"}, "dtype must be one of 'auto', 'float32'"),
        ({"grad_clip": math.nan}, "grad_clip must be a finite number >= 0, got nan"),
        ({"lr": math.inf}, "lr must be a finite number >= 0"),
        ({"lr_decay_steps": 0}, "lr_decay_steps must be >= 1"),
        ({"warmup_steps": 300}, "warmup_steps \\(300\\) must be < lr_decay_steps \\(300\\)"),
        ({"min_lr": 1.0}, "min_lr \\(1.0\\) must be <= lr"),
        ({"preset": "gpt5"}, "unknown preset 'gpt5'"),
        ({"dropout": 1.0}, "dropout must be in \\[0, 1\\)"),
        ({"n_layer": "4"}, "n_layer must be an int or null, got '4'"),
        ({"resume": True, "overwrite": True}, "pick one"),
        ({"allow_changes": True}, "allow_changes only applies with resume"),
        ({"data": ""}, "data must not be empty"),
        ({"attention": "flash"}, "attention must be one of 'sdpa', 'manual', got 'flash'"),
        ({"lr": [1]}, "^lr must be a number, got \\[1\\]$"),
        ({"dropout": True}, "^dropout must be a number or null, got True$"),
        ({"preset": 2}, "^preset must be a string, got 2$"),
    ],
)
def test_bad_values_are_refused_naming_the_field(fields, message):
    with pytest.raises(SettingsError, match=message):
        TrainSettings.from_dict(fields)


def test_a_config_that_is_not_an_object_or_names_unknown_fields_is_refused():
    with pytest.raises(SettingsError, match="JSON object"):
        TrainSettings.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="unknown training settings: \\['lr_max'\\]"):
        TrainSettings.from_dict({"lr_max": 1.0})


def test_ints_are_accepted_where_a_number_is_expected():
    assert TrainSettings.from_dict({"lr": 1, "min_lr": 0}).lr == 1.0
    settings = TrainSettings.from_dict({"lr": 1, "min_lr": 0, "dropout": 0, "max_steps": 7})
    assert isinstance(settings.lr, float) and isinstance(settings.dropout, float)
    assert settings.max_steps == 7 and isinstance(settings.max_steps, int)


def test_warmup_scales_with_short_runs_and_defaults_to_twenty_steps():
    assert TrainSettings(max_steps=300).resolved_warmup_steps == 20
    assert TrainSettings(max_steps=50).resolved_warmup_steps == 5
    assert TrainSettings(max_steps=5).resolved_warmup_steps == 0  # a 5-step run is valid
    resolved = TrainSettings(max_steps=50).resolved("float32")
    assert (resolved.warmup_steps, resolved.lr_decay_steps, resolved.autocast_dtype) == (
        5,
        50,
        "float32",
    )


def _saved(**fields):
    return TrainSettings(max_steps=300, **fields).resolved("float32").to_dict()


def test_the_former_name_dtype_reads_as_autocast_dtype_in_a_config_and_a_checkpoint():
    assert TrainSettings.from_dict({"dtype": "bfloat16"}).autocast_dtype == "bfloat16"
    older = {("dtype" if k == "autocast_dtype" else k): v for k, v in _saved().items()}
    requested = TrainSettings(max_steps=300, resume=True)
    settings, notes = resume_settings(requested, older, step=300)
    assert settings.autocast_dtype == "float32" and notes == []


def test_resume_keeps_the_runs_settings_and_its_schedule_when_extended():
    saved = _saved(lr=3e-3, batch_size=4)
    # What `--resume --max-steps 600` asks for: the saved settings and a longer run.
    requested = TrainSettings.from_dict({**saved, "max_steps": 600, "resume": True})
    settings, notes = resume_settings(requested, saved, step=300)
    assert (settings.lr, settings.batch_size, settings.max_steps) == (3e-3, 4, 600)
    assert settings.lr_decay_steps == 300  # the cosine still ends where the run planned
    assert any("extending the run from 300 to 600" in note for note in notes)


def test_resume_from_python_inherits_derived_fields_left_unset():
    saved = _saved()
    requested = TrainSettings(max_steps=600, resume=True)  # lr_decay_steps None: "unset"
    settings, _ = resume_settings(requested, saved, step=300)
    assert (settings.lr_decay_steps, settings.warmup_steps, settings.autocast_dtype) == (
        300,
        20,
        "float32",
    )


def test_resume_refuses_a_changed_run_setting_unless_allowed():
    saved = _saved()
    requested = TrainSettings.from_dict({**saved, "lr": 1e-3, "seed": 1, "resume": True})
    with pytest.raises(SettingsError, match="lr 0.002 -> 0.001, seed 0 -> 1.*--allow-changes"):
        resume_settings(requested, saved, step=100)
    allowed = TrainSettings.from_dict({**requested.to_dict(), "allow_changes": True})
    settings, notes = resume_settings(allowed, saved, step=100)
    assert (settings.lr, settings.seed) == (1e-3, 1)
    assert "changed lr 0.002 -> 0.001 (--allow-changes)" in notes


def test_resume_accepts_execution_changes_and_says_so():
    saved = _saved()
    requested = TrainSettings.from_dict(
        {**saved, "device": "cpu", "eval_interval": 50, "resume": True}
    )
    settings, notes = resume_settings(requested, saved, step=100)
    assert settings.eval_interval == 50
    assert "changed device 'auto' -> 'cpu'" in notes


def test_resume_cannot_go_back_before_the_checkpoint():
    saved = _saved()
    requested = TrainSettings.from_dict({**saved, "max_steps": 100, "resume": True})
    with pytest.raises(SettingsError, match="max_steps 100 is below the checkpoint's step 200"):
        resume_settings(requested, saved, step=200)
    # Stopping early, after the checkpoint, keeps the schedule and is fine.
    earlier = TrainSettings.from_dict({**saved, "max_steps": 250, "resume": True})
    settings, _ = resume_settings(earlier, saved, step=200)
    assert (settings.max_steps, settings.lr_decay_steps) == (250, 300)


def test_a_run_resumed_with_flags_resumes_again_without_them():
    # A checkpoint records the settings of the command that wrote it, flags included; the
    # flags say how that command started and are not the run's.
    resumed = TrainSettings(resume=True, allow_changes=True, from_step=3)
    settings, notes = resume_settings(TrainSettings(resume=True), resumed.to_dict(), step=4)
    assert settings.resume and settings.from_step is None and not settings.allow_changes
    assert notes == []
