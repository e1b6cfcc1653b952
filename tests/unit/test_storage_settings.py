"""[storage] backend = "s3": what check-config and the start refuse, sizes, the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config_check import check_config
from router.secrets import SecretBox
from router.settings import SettingsError, load_settings
from router.storage.blobs import BlobStore, open_blob_store


def problems_of(tmp_path: Path, storage: str) -> list[str]:
    config = tmp_path / "router.toml"
    config.write_text(f"[storage]\n{storage}\n")
    return check_config(config)


def test_the_local_backend_is_the_default_and_needs_nothing(tmp_path: Path) -> None:
    settings = load_settings({}, data_dir=tmp_path)
    assert settings.storage.backend == "local"
    assert settings.storage.cache_size == 10 * 1000**3
    store = open_blob_store(settings, SecretBox(b"k" * 32), check=True)
    assert type(store) is BlobStore and not store.remote
    assert store.blob_dir == tmp_path / "blobs"


def test_s3_needs_a_bucket(tmp_path: Path) -> None:
    assert problems_of(tmp_path, 'backend = "s3"') == [
        'storage.bucket: required when backend = "s3"']


@pytest.mark.parametrize(("line", "problem"), [
    ('bucket = "Bad_Bucket"', "storage.bucket: must be a valid bucket name"),
    ('prefix = "/abs"', "storage.prefix: must not start with '/'"),
    ('prefix = "a/../b"', "storage.prefix: must not contain '.' or '..' components"),
    ('prefix = "a b"', "storage.prefix: may only use letters, digits"),
    ('endpoint_url = "ftp://x"', "storage.endpoint_url: must be an http:// or https:// URL"),
    ('region = "Mars 1"', "storage.region: must look like us-east-1"),
    ('access_key_id = "AKIA"', "storage.secret_access_key: set both"),
    ('cache_size = "lots"', "storage.cache_size: expected a size such as '512MB'"),
])
def test_s3_settings_are_checked(tmp_path: Path, line: str, problem: str) -> None:
    base = 'backend = "s3"\nbucket = "imaging"\n'
    if line.startswith("bucket"):
        base = 'backend = "s3"\n'
    problems = problems_of(tmp_path, base + line)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_a_valid_s3_table_passes_check_config(tmp_path: Path) -> None:
    assert problems_of(tmp_path, '\n'.join([
        'backend = "s3"', 'bucket = "imaging"', 'prefix = "site-a/blobs/"',
        'endpoint_url = "http://minio:9000"', 'region = "eu-west-1"',
        'access_key_id = "AKIA"', 'secret_access_key = "enc:v1:abc"',
        'cache_size = "512MiB"'])) == []


def test_s3_settings_come_from_the_environment_too(tmp_path: Path) -> None:
    settings = load_settings({"DICOM_ROUTER_STORAGE_BACKEND": "s3",
                              "DICOM_ROUTER_STORAGE_BUCKET": "imaging",
                              "DICOM_ROUTER_STORAGE_CACHE_SIZE": "1.5GiB"}, data_dir=tmp_path)
    assert settings.storage.bucket == "imaging"
    assert settings.storage.cache_size == int(1.5 * 1024**3)
    with pytest.raises(SettingsError, match="DICOM_ROUTER_STORAGE_BUCKET"):
        load_settings({"DICOM_ROUTER_STORAGE_BACKEND": "s3",
                       "DICOM_ROUTER_STORAGE_BUCKET": "x"}, data_dir=tmp_path)


@pytest.mark.parametrize(("text", "size"), [
    (1048576, 1048576), ("10GB", 10 * 1000**3), ("10 gb", 10 * 1000**3), ("1GiB", 1024**3),
    ("512MB", 512 * 1000**2), ("64k", 64000), ("2TiB", 2 * 1024**4)])
def test_cache_sizes(tmp_path: Path, text: object, size: int) -> None:
    config = tmp_path / "router.toml"
    value = f'"{text}"' if isinstance(text, str) else str(text)
    config.write_text(f"[storage]\ncache_size = {value}\n")
    assert load_settings({}, config, tmp_path).storage.cache_size == size


def test_seal_secret_prints_a_value_the_router_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from router.cli import main
    from router.secrets import load_master_key
    from router.storage.blobs import STORAGE_SECRET_CONTEXT

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cr3t-value\n"))
    assert main(["--data-dir", str(tmp_path), "seal-secret", "storage.secret_access_key"]) == 0
    sealed = capsys.readouterr().out.strip()
    assert sealed.startswith("enc:v1:") and "s3cr3t-value" not in sealed
    box = SecretBox(load_master_key(None, tmp_path))
    assert box.open(sealed, context=STORAGE_SECRET_CONTEXT) == "s3cr3t-value"


def test_the_secret_is_not_in_the_settings_repr(tmp_path: Path) -> None:
    settings = load_settings({"DICOM_ROUTER_STORAGE_BACKEND": "s3",
                              "DICOM_ROUTER_STORAGE_BUCKET": "imaging",
                              "DICOM_ROUTER_STORAGE_ACCESS_KEY_ID": "AKIAEXAMPLE",
                              "DICOM_ROUTER_STORAGE_SECRET_ACCESS_KEY": "very-secret-value"},
                             data_dir=tmp_path)
    assert settings.storage.secret_access_key == "very-secret-value"
    assert "very-secret-value" not in repr(settings)
