"""Each patch of server/flower_patches.py works, and the Flower behaviour it changes is still
there: a Flower upgrade that changes that behaviour fails the test named after the patch."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import ssl

import flwr
import pytest
import uvicorn.config
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAvg,
)

from server import pki
from server.flower_patches import (
    FLOWER_VERSION,
    SQLITE_BUSY_TIMEOUT_MS,
    ClientSideAdaptiveClipping,
    ServerSideAdaptiveClipping,
    log_refused_handshakes,
    wait_longer_for_database_locks,
)

REVISIT = "Flower changed what server/flower_patches.py patches: revisit or drop "


def test_installed_flower_is_the_release_the_patches_were_written_against():
    assert flwr.__version__ == FLOWER_VERSION, REVISIT + "every patch"


# --- SQLite busy timeout --------------------------------------------------------------------

def test_flower_still_gives_sqlite_locks_five_seconds():
    from flwr.supercore import constant, sql_mixin

    assert dict(constant.SQLITE_PRAGMAS)["busy_timeout"] == "5000", \
        REVISIT + "wait_longer_for_database_locks"
    # the module-level name the patch replaces is what Flower reads for each connection
    assert "SQLITE_PRAGMAS" in sql_mixin._set_sqlite_pragmas.__code__.co_names, \
        REVISIT + "wait_longer_for_database_locks"


def test_superlink_state_waits_longer_for_sqlite_locks(tmp_path):
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    wait_longer_for_database_locks()
    state = LinkStateFactory(str(tmp_path / "state.db"), NoOpFederationManager(),
                             ObjectStoreFactory()).state()
    assert state.query("PRAGMA busy_timeout") == [{"timeout": SQLITE_BUSY_TIMEOUT_MS}]


# --- logged TLS handshakes ------------------------------------------------------------------

def test_flower_still_serves_the_superlink_with_uvicorns_own_tls_context():
    source = inspect.getsource(importlib.import_module("flwr.superlink.cli.flower_superlink"))
    assert "uvicorn.run(" in source and "ssl_certfile=" in source, \
        REVISIT + "log_refused_handshakes"
    assert "ssl_context_factory" not in source, REVISIT + "log_refused_handshakes"
    assert "create_ssl_context" in uvicorn.config.Config.load.__code__.co_names, \
        "uvicorn no longer builds its context with create_ssl_context: revisit " \
        "log_refused_handshakes"


def _server_certificate(tmp_path) -> tuple[str, str]:
    ca_key, key = pki.new_key(), pki.new_key()
    ca = pki.issue_ca(ca_key, "test", days=1)
    cert = pki.server_certificate_for(ca_key, ca, key, ["localhost"], days=1)
    (tmp_path / "server.pem").write_bytes(pki.certificate_pem(cert))
    pki.write_private_key(tmp_path / "server.key", key)
    return str(tmp_path / "server.pem"), str(tmp_path / "server.key")


def _plaintext_handshake(context: ssl.SSLContext) -> ssl.SSLError:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = context.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    with pytest.raises(ssl.SSLError) as refused:
        server.do_handshake()
    return refused.value


def test_uvicorn_contexts_log_refused_handshakes_and_no_other_context_changes(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(uvicorn.config, "create_ssl_context", uvicorn.config.create_ssl_context)
    certfile, keyfile = _server_certificate(tmp_path)
    log_refused_handshakes()
    log_refused_handshakes()  # applying twice wraps once
    config = uvicorn.config.Config(app=None, ssl_certfile=certfile, ssl_keyfile=keyfile)
    config.load()

    with caplog.at_level(logging.WARNING, logger="flwr"):
        error = _plaintext_handshake(config.ssl)
    assert error.reason == "HTTP_REQUEST"
    assert [r.getMessage() for r in caplog.records] == [
        "TLS handshake refused: the client spoke plaintext HTTP to this TLS port (SuperNode "
        "started with --insecure?) [HTTP_REQUEST]"]

    caplog.clear()
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.load_cert_chain(certfile, keyfile)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _plaintext_handshake(other)
    assert not caplog.records
    assert ssl.SSLContext.sslobject_class is ssl.SSLObject
    assert ssl.create_default_context().sslobject_class is ssl.SSLObject


# --- adaptive clipping sign -----------------------------------------------------------------

@pytest.mark.parametrize("flower_wrapper", [DifferentialPrivacyServerSideAdaptiveClipping,
                                            DifferentialPrivacyClientSideAdaptiveClipping])
def test_flower_adaptive_clipping_still_shrinks_the_norm_when_most_updates_are_clipped(
        flower_wrapper):
    wrapper = flower_wrapper(FedAvg(), noise_multiplier=0.01, num_sampled_clients=3,
                             initial_clipping_norm=1.0, target_clipped_quantile=0.5,
                             clip_norm_lr=0.2)
    wrapper._geometric_update(1.0)  # every update clipped: the norm should grow
    assert wrapper.clipping_norm < 1.0, REVISIT + "ClipNormTowardsTargetQuantile"


@pytest.mark.parametrize("wrapper_class", [ServerSideAdaptiveClipping,
                                           ClientSideAdaptiveClipping])
def test_patched_adaptive_clipping_moves_the_norm_towards_the_target(wrapper_class):
    wrapper = wrapper_class(FedAvg(), noise_multiplier=0.01, num_sampled_clients=3,
                            initial_clipping_norm=1.0, target_clipped_quantile=0.5,
                            clip_norm_lr=0.2)
    wrapper._geometric_update(1.0)
    assert wrapper.clipping_norm == pytest.approx(math.exp(0.1))
    wrapper._geometric_update(0.0)
    assert wrapper.clipping_norm == pytest.approx(1.0)

