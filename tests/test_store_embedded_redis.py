import numpy as np
import pytest
import redis

from index.redis_server import EmbeddedRedis, find_redis_server
from index.store import RedisStore, image_id


def test_binary_found():
    assert find_redis_server()


def test_embedded_redis_persists_acknowledged_writes_across_kill(tmp_path):
    """appendfsync always: a write acknowledged before SIGKILL is there after restart."""
    srv = EmbeddedRedis(tmp_path / "r")
    with srv:
        url = srv.url
        assert url.startswith("redis://127.0.0.1:")
        store = RedisStore(url)
        i = image_id("g", b"x")
        store.put("g", i, np.arange(4, dtype=np.float32), {"camera_id": "2"})
        store.close()
        srv.kill()  # no SHUTDOWN, no save: only the AOF can bring it back
        assert not srv.running
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        srv.start()
        assert srv.url == url  # same port after restart
        store = RedisStore(srv.url)
        assert store.get("g", i).metadata["camera_id"] == "2"
        np.testing.assert_array_equal(store.get_vector("g", i), np.arange(4, dtype=np.float32))
        store.close()
    assert not srv.running
    assert (tmp_path / "r" / "appendonly.aof").exists()


def test_stop_then_restart_same_dir(tmp_path):
    with EmbeddedRedis(tmp_path) as srv:
        RedisStore(srv.url).create_gallery("kept")
    with EmbeddedRedis(tmp_path) as srv:  # new port, same data
        assert RedisStore(srv.url).list_galleries() == ["kept"]


def test_bad_binary_fails_clearly(tmp_path):
    with pytest.raises((RuntimeError, OSError)):
        EmbeddedRedis(tmp_path, binary=str(tmp_path / "nope")).start()
