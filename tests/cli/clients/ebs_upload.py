"""Uploads a raw image through the EBS direct API with botocore (AWS's own
Python SDK, which the AWS CLI carries inside it): StartSnapshot, PutSnapshotBlock
for each 512 KiB block that is not all zeros (or only the blocks named),
CompleteSnapshot with the LINEAR aggregate checksum. Prints the snapshot id.

usage: ebs_upload.py ENDPOINT IMAGE [--parent SNAP] [--blocks I,J,...]
"""
import argparse
import base64
import hashlib
import os

try:
    from awscli.botocore.session import get_session
except ImportError:
    from botocore.session import get_session

BLOCK = 512 * 1024
GIB = 1 << 30

p = argparse.ArgumentParser()
p.add_argument("endpoint")
p.add_argument("image")
p.add_argument("--parent")
p.add_argument("--blocks")
a = p.parse_args()

ebs = get_session().create_client(
    "ebs", endpoint_url=a.endpoint, region_name=os.environ["AWS_DEFAULT_REGION"]
)
size = os.path.getsize(a.image)
start = {"VolumeSize": (size + GIB - 1) // GIB, "Timeout": 60}
if a.parent:
    start["ParentSnapshotId"] = a.parent
snap = ebs.start_snapshot(**start)["SnapshotId"]
digests = []
with open(a.image, "rb") as f:
    if a.blocks:
        indices = [int(i) for i in a.blocks.split(",")]
    else:
        indices = range((size + BLOCK - 1) // BLOCK)
    for i in indices:
        f.seek(i * BLOCK)
        data = f.read(BLOCK).ljust(BLOCK, b"\0")
        if not a.blocks and data == bytes(BLOCK):
            continue
        sha = hashlib.sha256(data).digest()
        ebs.put_snapshot_block(
            SnapshotId=snap,
            BlockIndex=i,
            BlockData=data,
            DataLength=BLOCK,
            Checksum=base64.b64encode(sha).decode(),
            ChecksumAlgorithm="SHA256",
        )
        digests.append(sha)
aggregate = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
ebs.complete_snapshot(
    SnapshotId=snap,
    ChangedBlocksCount=len(digests),
    Checksum=aggregate,
    ChecksumAlgorithm="SHA256",
    ChecksumAggregationMethod="LINEAR",
)
print(snap)
