"""Sends the same EBS direct API and EC2 requests to blocksnap and to moto
(the AWS mock many projects test against) with boto3, and prints, per
operation, how the shapes of the answers differ: keys one side has and the
other lacks, and values of different types. Values themselves are not
compared.

usage: compare_moto.py BLOCKSNAP_URL BLOCKSNAP_IMAGE_ID OTHER_ACCOUNT
(blocksnap's credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; the
image is one of theirs, registered with the CLI, backed by a snapshot.)
"""
import base64
import hashlib
import json
import os
import socket
import sys

import boto3
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

BLOCK = 512 * 1024


def shape(v):
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items() if k != "ResponseMetadata"}
    if isinstance(v, list):
        return [shape(v[0])] if v else []
    return type(v).__name__


def diff(a, b, path=""):
    """Differences of shape `a` (blocksnap) from `b` (moto)."""
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else k
            if k not in a:
                out.append(f"missing {p}")
            elif k not in b:
                out.append(f"extra {p}")
            else:
                out += diff(a[k], b[k], p)
    elif isinstance(a, list) and isinstance(b, list):
        if a and b:
            out += diff(a[0], b[0], path + "[]")
    elif a != b:
        out.append(f"type {path}: {a} vs {b}")
    return out


def run(ebs, ec2, image_id, other, moto):
    got = {}

    def call(name, fn, **kw):
        try:
            r = fn(**kw)
        except ClientError as e:
            r = {"Error": {"Code": e.response["Error"]["Code"]}}
        got[name] = r
        return r

    data = os.urandom(BLOCK)
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    s = call("StartSnapshot", ebs.start_snapshot, VolumeSize=1, Timeout=60, Description="cmp")
    sid = s["SnapshotId"]
    call("PutSnapshotBlock", ebs.put_snapshot_block, SnapshotId=sid, BlockIndex=0, BlockData=data,
         DataLength=BLOCK, Checksum=sha, ChecksumAlgorithm="SHA256")
    call("CompleteSnapshot", ebs.complete_snapshot, SnapshotId=sid, ChangedBlocksCount=1)
    blocks = call("ListSnapshotBlocks", ebs.list_snapshot_blocks, SnapshotId=sid)
    token = blocks["Blocks"][0]["BlockToken"]
    g = call("GetSnapshotBlock", ebs.get_snapshot_block, SnapshotId=sid, BlockIndex=0, BlockToken=token)
    body = g.pop("BlockData").read()
    assert body == data, "GetSnapshotBlock returned other bytes"
    # moto fails a ListChangedBlocks without a first snapshot (KeyError):
    # compare the snapshot with itself.
    call("ListChangedBlocks", ebs.list_changed_blocks, FirstSnapshotId=sid, SecondSnapshotId=sid)

    if moto:
        # moto's EC2 knows only its own snapshots and images.
        vol = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
        snap = ec2.create_snapshot(VolumeId=vol, Description="cmp")["SnapshotId"]
        image_id = ec2.register_image(
            Name="cmp", RootDeviceName="/dev/xvda", Architecture="x86_64",
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}],
        )["ImageId"]
    else:
        snap = sid
    call("DescribeSnapshots", ec2.describe_snapshots, SnapshotIds=[snap])
    call("DescribeSnapshots(missing)", ec2.describe_snapshots, SnapshotIds=["snap-0123456789abcdef0"])
    call("ModifySnapshotAttribute", ec2.modify_snapshot_attribute, SnapshotId=snap,
         Attribute="createVolumePermission", OperationType="add", UserIds=[other])
    call("DescribeSnapshotAttribute", ec2.describe_snapshot_attribute, SnapshotId=snap,
         Attribute="createVolumePermission")
    call("DescribeImages", ec2.describe_images, ImageIds=[image_id])
    call("DescribeImages(missing)", ec2.describe_images, ImageIds=["ami-0123456789abcdef0"])
    call("ModifyImageAttribute", ec2.modify_image_attribute, ImageId=image_id,
         LaunchPermission={"Add": [{"UserId": other}]})
    call("DescribeImageAttribute", ec2.describe_image_attribute, ImageId=image_id,
         Attribute="launchPermission")
    call("DeregisterImage", ec2.deregister_image, ImageId=image_id)
    call("DeleteSnapshot(in use or not)", ec2.delete_snapshot, SnapshotId=snap)
    return got


def main():
    url, image_id, other = sys.argv[1:4]
    region = os.environ.get("AWS_DEFAULT_REGION", "local")
    bs = boto3.session.Session(region_name=region)
    ours = run(bs.client("ebs", endpoint_url=url), bs.client("ec2", endpoint_url=url),
               image_id, other, moto=False)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        ms = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                   region_name="us-east-1")
        murl = f"http://127.0.0.1:{port}"
        theirs = run(ms.client("ebs", endpoint_url=murl), ms.client("ec2", endpoint_url=murl),
                     None, other, moto=True)
    finally:
        server.stop()
    report = {op: diff(shape(ours[op]), shape(theirs[op])) for op in ours}
    print(json.dumps(report, indent=1))


main()
