/** The sans-IO NBD codec: constants, encoders, decoders and incremental parsers for both directions. */
export { ByteQueue } from "./bytes.ts";
export * from "./constants.ts";
export * from "./decode.ts";
export * from "./encode.ts";
export { NbdProtocolError, type NbdProtocolErrorReason } from "./errors.ts";
export * from "./parser.ts";
