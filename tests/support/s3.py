"""A real S3-compatible server on 127.0.0.1: moto's standalone server (its own thread)."""

from __future__ import annotations

import socket


class LoopbackS3:
    """moto's server on a free loopback port; `env` is what a client process needs to reach
    it the standard way (AWS_ENDPOINT_URL and test credentials, no metadata lookups)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
        }

    def __enter__(self) -> LoopbackS3:
        import requests

        self.server.start()
        # moto keeps its buckets in this process, across servers: start from none
        requests.post(f"{self.endpoint}/moto-api/reset", timeout=30).raise_for_status()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    def filesystem(self):
        """An s3fs filesystem on this server (fresh, not fsspec's cached instance)."""
        import s3fs

        return s3fs.S3FileSystem(
            key="testing", secret="testing", endpoint_url=self.endpoint, skip_instance_cache=True
        )

    def bucket(self, name: str) -> str:
        self.filesystem().mkdir(name)
        return name
