from clusterconnect.v1 import tunnel_pb2 as _tunnel_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
