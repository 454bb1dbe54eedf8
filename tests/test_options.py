"""Options defined once: checks name the API parameter, the CLI names its flag, and the CLI's
options are the dataclasses' fields with their defaults."""

from __future__ import annotations

import dataclasses

import pytest

from imgsim_dask import cli
from imgsim_dask.errors import InputError
from imgsim_dask.options import (
    OPTION_CLASSES,
    ClusterOptions,
    CsvOptions,
    ExtractOptions,
    FetchOptions,
    MatchOptions,
    OptionError,
    flag_of,
    opt,
    with_overrides,
)

from support.cli import assert_usage_error, imgsim


@pytest.mark.parametrize(
    "make, api, flag",
    [
        (
            lambda: ExtractOptions(batch_size=0),
            "batch_size must be an integer of at least 1",
            "--batch-size must be",
        ),
        (
            lambda: ExtractOptions(model="resnet"),
            "unknown model 'resnet'; choose one of: mobilenet",
            "unknown --model 'resnet'",
        ),
        (
            lambda: ExtractOptions(image_size=16),
            "image_size must be an integer of at least 32",
            "--image-size must be",
        ),
        (
            lambda: FetchOptions(read_timeout=0.01),
            "read_timeout must be a number of at least 0.1",
            "--timeout must be",
        ),
        (
            lambda: FetchOptions(schemes=("ftp",)),
            "schemes: unsupported scheme(s) ['ftp']",
            "--schemes: unsupported",
        ),
        (lambda: MatchOptions(threshold=2.0), "threshold 2.0 is outside [-1, 1]", "--thresh 2.0"),
        (
            lambda: ExtractOptions(overwrite=True, resume=True),
            "overwrite excludes resume and retry_failed",
            "--overwrite excludes --resume and --retry-failed",
        ),
        (
            lambda: ClusterOptions(scheduler="tcp://127.0.0.1:1", workers=2),
            "workers sizes the local cluster",
            "--workers sizes the local cluster",
        ),
        (lambda: CsvOptions(delimiter=";;"), "delimiter must be one character", "--delimiter must"),
    ],
)
def test_a_bad_value_names_the_parameter_in_python_and_the_flag_in_the_cli(make, api, flag):
    with pytest.raises(OptionError) as error:
        make()
    assert api in str(error.value) and "\n" not in str(error.value)
    assert flag in error.value.render(lambda name: cli.FLAGS.get(name, name))
    assert isinstance(error.value, InputError)  # one line, exit 2


def test_an_option_name_in_a_message_is_not_confused_with_text_in_braces():
    error = OptionError(f"{opt('cols')} names {{cols}}.csv")
    assert str(error) == "cols names {cols}.csv"
    assert error.render(lambda name: "--" + name) == "--cols names {cols}.csv"


def test_every_cli_flag_of_a_command_is_an_option_field_with_its_default():
    """The CLI declares no option of its own: `extract`'s options are the fields' (plus
    --name, --store and -h), with the fields' defaults."""
    fields = {
        flag_of(f).split("/")[0]: f
        for cls in OPTION_CLASSES
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli")
    }
    params = {p.opts[0]: p for p in cli.extract.params if p.opts[0].startswith("--")}
    assert set(params) - set(fields) == {"--name", "--store"}
    for flag, param in params.items():
        if flag in fields and not dataclasses.is_dataclass(fields[flag].default):
            default = fields[flag].default
            if isinstance(default, tuple):
                default = ",".join(default)
            assert param.default == default, flag


def test_overrides_go_to_the_object_that_has_the_field_and_are_checked_there():
    options, csv_options = with_overrides(
        {"batch_size": 8, "url_col": "link"}, ExtractOptions(), CsvOptions()
    )
    assert options.batch_size == 8 and csv_options.url_col == "link"
    with pytest.raises(TypeError, match="unknown option"):
        with_overrides({"batchsize": 8}, ExtractOptions())
    with pytest.raises(OptionError, match="batch_size"):
        with_overrides({"batch_size": -1}, ExtractOptions())


def test_a_tab_delimiter_and_comma_lists_read_as_in_python():
    assert CsvOptions(delimiter="\\t").delimiter == "\t"
    assert FetchOptions(public_only=True).schemes == ("http", "https")  # no local files


def test_cli_errors_name_flags(tmp_path):
    (tmp_path / "in.csv").write_text("id,url\n1,a.jpg\n")
    assert_usage_error(
        imgsim("extract", "in.csv", "--name", "a", "--overwrite", "--resume", cwd=tmp_path),
        "--overwrite excludes --resume and --retry-failed",
    )
    assert_usage_error(
        imgsim("extract", "in.csv", "--name", "a", "--cols", "id,id", cwd=tmp_path),
        "--cols names a column twice",
    )


@pytest.mark.parametrize(
    "command", [["extract", "in.csv", "--name", "a"], ["dedupe", "a"], ["run", "in.csv"]]
)
def test_a_store_url_of_no_known_filesystem_is_refused_not_made_a_local_folder(tmp_path, command):
    (tmp_path / "in.csv").write_text("id,url\n1,a.jpg\n")
    assert_usage_error(
        imgsim(*command, "--store", "nosuchfs://bucket/x", cwd=tmp_path),
        "--store nosuchfs://bucket/x: Protocol not known: nosuchfs",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]  # no ./nosuchfs:/bucket/x
