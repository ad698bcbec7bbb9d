"""Dask clusters open nothing they need not: a local cluster listens on loopback only, talks TLS with a
per-run certificate (no other local client can attach), and serves a working dashboard there (or none with
--no-dashboard); a remote scheduler is reached over TLS with certificates from flags, tested against a real
`dask scheduler` and `dask worker` using self-signed certificates on loopback."""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import curate, external_dask_cluster

from pipeline.cluster import dask_client


def _listening(pid: int) -> set[tuple[str, int]]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def test_local_cluster_is_loopback_only_with_a_working_dashboard():
    from distributed import Client

    with dask_client(workers=2, quiet=True) as client:
        socks = _listening(os.getpid())
        assert socks and all(ipaddress.ip_address(ip).is_loopback for ip, _ in socks), socks
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(link, timeout=30) as r:
            body = r.read().decode()
        assert r.status == 200 and "bokeh" in body.lower() and "needs bokeh" not in body
        # a client without the run's certificate cannot attach (it could run code on the workers)
        with pytest.raises((OSError, TimeoutError)):
            Client(client.scheduler.address.replace("tls://", "tcp://"), timeout="3s")


def test_no_dashboard_serves_no_dashboard_and_one_worker_stays_on_loopback():
    for workers in (1, 2):
        with dask_client(workers=workers, quiet=True, dashboard=False) as client:
            socks = _listening(os.getpid())
            assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in socks), socks
            with pytest.raises(urllib.error.URLError):        # refused, or no such page
                urllib.request.urlopen(client.dashboard_link, timeout=30)
    with dask_client(workers=1, quiet=True) as client:
        socks = _listening(os.getpid())
        assert socks and all(ipaddress.ip_address(ip).is_loopback for ip, _ in socks), socks


def _self_signed(dirpath: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "curate-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = dirpath / "cert.pem", dirpath / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_remote_tls_scheduler(tmp_path, sample_dir):
    from distributed.security import Security

    cert, key = _self_signed(tmp_path)
    tls = ["--tls-ca-file", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    security = Security(tls_ca_file=str(cert), tls_client_cert=str(cert), tls_client_key=str(key),
                        require_encryption=True)
    with external_dask_cluster(tmp_path, 1, tls=tls, security=security) as address:
        assert address.startswith("tls://")
        out = tmp_path / "out"
        curate("filter", sample_dir / "train", "--out", out, "--scheduler", address, *tls, "--no-progress")
        m = json.loads((out / "manifest.json").read_text())
        assert m["cluster"]["scheduler"] == address and m["shards"]["failed"] == 0
        assert m["totals"]["docs_in"] > 0

        # without certificates: a clear error, not a hang or a traceback
        proc = curate("filter", sample_dir / "train", "--out", tmp_path / "o2", "--scheduler", address, check=False)
        assert proc.returncode == 2 and "uses TLS: give --tls-ca-file" in proc.stderr, proc.stderr
        proc = curate("filter", sample_dir / "train", "--out", tmp_path / "o3", "--scheduler", address,
                      "--tls-ca-file", str(tmp_path / "missing.pem"), "--tls-cert", str(cert), check=False)
        assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
