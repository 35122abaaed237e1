import urllib.error
import urllib.request

import pytest

from groundset.testing.sample_server import SAMPLE_HOST, proxy_env, resolve, serve


def fetch(proxy, url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    with opener.open(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_serves_files_through_the_proxy_and_stops(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"\xff\xd8jpegbytes")
    with serve(tmp_path) as proxy:
        assert proxy.startswith("http://127.0.0.1:")
        status, ctype, body = fetch(proxy, f"http://{SAMPLE_HOST}/img/a.jpg")
        assert (status, ctype, body) == (200, "image/jpeg", b"\xff\xd8jpegbytes")
        with pytest.raises(urllib.error.HTTPError) as err:
            fetch(proxy, f"http://{SAMPLE_HOST}/img/missing.jpg")
        assert err.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as err:
            fetch(proxy, "http://elsewhere.invalid/img/a.jpg")
        assert err.value.code == 502
    with pytest.raises(urllib.error.URLError):
        fetch(proxy, f"http://{SAMPLE_HOST}/img/a.jpg")


def test_resolve_refuses_paths_outside_the_root(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").write_text("x")
    assert resolve((tmp_path / "root").resolve(), "/../secret") is None


def test_proxy_env_routes_plain_http_only_through_the_proxy():
    env = proxy_env("http://127.0.0.1:1", {"no_proxy": "*", "https_proxy": "x", "PATH": "/bin"})
    assert env == {
        "http_proxy": "http://127.0.0.1:1",
        "HTTP_PROXY": "http://127.0.0.1:1",
        "PATH": "/bin",
    }


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"), serve(tmp_path / "nope"):
        pass
