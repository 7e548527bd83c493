"""Create the deployment's S3 buckets if missing, with versioning on, so an overwritten or deleted object (an MLflow
artifact, a DVC cache file) can be restored (docs/deployment.md, "Backups").

    python deploy/create_buckets.py s3://mumic-mlflow s3://mumic-dvc

The S3 client reads its endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
(deploy/env.example). docker compose runs it once before the MLflow server starts (service `create-buckets`).
"""

from __future__ import annotations

import sys
from urllib.parse import urlparse

import boto3
from botocore.exceptions import ClientError


def bucket_name(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url!r} is not an s3://bucket URL")
    return parsed.netloc


def ensure_buckets(client, urls: list[str]) -> list[str]:
    """Each bucket exists and keeps object versions; returns the bucket names. Running it again changes nothing."""
    names = [bucket_name(url) for url in urls]
    for name in names:
        try:
            client.create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
                raise
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return names


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for name in ensure_buckets(boto3.client("s3"), argv):
        print(f"bucket {name}: ready, versioning on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
