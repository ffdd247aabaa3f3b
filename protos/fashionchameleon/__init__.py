"""FashionChameleon API definitions (protobuf / gRPC). Sources: ``protos/fashionchameleon/*/*.proto``."""
