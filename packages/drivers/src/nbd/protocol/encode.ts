/**
 * Pure NBD encoders (no I/O): every function returns fresh bytes, big-endian as the wire wants.
 *
 * References: NetworkBlockDevice/nbd `doc/proto.md` — "Fixed newstyle negotiation", "Option types",
 * "Option reply types", "Request message", "Simple reply message", "Structured reply chunk message",
 * "Structured reply types". Payload data (READ data, WRITE data) is never copied here: encoders return
 * headers, and the caller writes header and data one after the other.
 */
import {
  NBD_CHUNK_HEADER_SIZE,
  NBD_IHAVEOPT,
  NBD_INFO,
  NBD_MAGIC,
  NBD_MAX_STRING,
  NBD_OPTION_HEADER_SIZE,
  NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_REP,
  NBD_REP_MAGIC,
  NBD_REPLY_TYPE,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
} from "./constants.ts";
import { NbdProtocolError } from "./errors.ts";

const utf8 = new TextEncoder();

/** UTF-8 bytes of a protocol string; checks the spec's 4096-byte limit. @throws {NbdProtocolError} */
export function encodeString(s: string, what = "string"): Uint8Array {
  const b = utf8.encode(s);
  if (b.length > NBD_MAX_STRING) {
    throw new NbdProtocolError("TOO_LONG", `${what} is ${b.length} bytes, longer than ${NBD_MAX_STRING}`);
  }
  return b;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** Writes a u64 given as a number (< 2^53) at `off`. */
export function setU64(dv: DataView, off: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new NbdProtocolError("BAD_VALUE", `u64 value ${value} is not an integer in [0, 2^53)`);
  }
  dv.setUint32(off, Math.floor(value / 0x100000000));
  dv.setUint32(off + 4, value >>> 0);
}

/** Checks a u32 field value. */
function u32(value: number, what: string): number {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new NbdProtocolError("BAD_VALUE", `${what} ${value} does not fit in 32 bits`);
  }
  return value;
}

// ---- handshake ------------------------------------------------------------------------------------------

/** The server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags (18 bytes). */
export function encodeGreeting(handshakeFlags: number): Uint8Array {
  const b = new Uint8Array(18);
  const dv = view(b);
  dv.setBigUint64(0, NBD_MAGIC);
  dv.setBigUint64(8, NBD_IHAVEOPT);
  dv.setUint16(16, handshakeFlags);
  return b;
}

/** The 32-bit client flags. */
export function encodeClientFlags(flags: number): Uint8Array {
  const b = new Uint8Array(4);
  view(b).setUint32(0, u32(flags, "client flags"));
  return b;
}

/** An option request: IHAVEOPT, u32 option, u32 length, data. */
export function encodeOption(option: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const b = new Uint8Array(NBD_OPTION_HEADER_SIZE + data.length);
  const dv = view(b);
  dv.setBigUint64(0, NBD_IHAVEOPT);
  dv.setUint32(8, u32(option, "option"));
  dv.setUint32(12, data.length);
  b.set(data, NBD_OPTION_HEADER_SIZE);
  return b;
}

/** Data of an `NBD_OPT_INFO` / `NBD_OPT_GO` request: name and the info types asked for. */
export function encodeInfoRequestData(name: string, infos: readonly number[] = []): Uint8Array {
  const n = encodeString(name, "export name");
  const b = new Uint8Array(4 + n.length + 2 + 2 * infos.length);
  const dv = view(b);
  dv.setUint32(0, n.length);
  b.set(n, 4);
  dv.setUint16(4 + n.length, infos.length);
  for (const [i, t] of infos.entries()) dv.setUint16(6 + n.length + 2 * i, t);
  return b;
}

/** Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: export name and queries. */
export function encodeMetaContextRequestData(name: string, queries: readonly string[]): Uint8Array {
  const n = encodeString(name, "export name");
  const qs = queries.map((q) => encodeString(q, "context query"));
  const total = 4 + n.length + 4 + qs.reduce((s, q) => s + 4 + q.length, 0);
  const b = new Uint8Array(total);
  const dv = view(b);
  dv.setUint32(0, n.length);
  b.set(n, 4);
  let off = 4 + n.length;
  dv.setUint32(off, qs.length);
  off += 4;
  for (const q of qs) {
    dv.setUint32(off, q.length);
    b.set(q, off + 4);
    off += 4 + q.length;
  }
  return b;
}

/** An option reply: magic, option echoed, reply type, length, data. */
export function encodeOptionReply(
  option: number,
  type: number,
  data: Uint8Array = new Uint8Array(0),
): Uint8Array {
  const b = new Uint8Array(NBD_OPTION_REPLY_HEADER_SIZE + data.length);
  const dv = view(b);
  dv.setBigUint64(0, NBD_REP_MAGIC);
  dv.setUint32(8, u32(option, "option"));
  dv.setUint32(12, u32(type, "reply type"));
  dv.setUint32(16, data.length);
  b.set(data, NBD_OPTION_REPLY_HEADER_SIZE);
  return b;
}

/** An error option reply carrying a message (may be empty). */
export function encodeOptionError(option: number, type: number, message = ""): Uint8Array {
  return encodeOptionReply(option, type, encodeString(message, "error message"));
}

/** `NBD_REP_SERVER` reply to LIST: export name and optional description. */
export function encodeRepServer(option: number, name: string, description = ""): Uint8Array {
  const n = encodeString(name, "export name");
  const d = encodeString(description, "description");
  const data = new Uint8Array(4 + n.length + d.length);
  view(data).setUint32(0, n.length);
  data.set(n, 4);
  data.set(d, 4 + n.length);
  return encodeOptionReply(option, NBD_REP.SERVER, data);
}

/** `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size and transmission flags. */
export function encodeInfoExport(option: number, size: number, transmissionFlags: number): Uint8Array {
  const data = new Uint8Array(12);
  const dv = view(data);
  dv.setUint16(0, NBD_INFO.EXPORT);
  setU64(dv, 2, size);
  dv.setUint16(10, transmissionFlags);
  return encodeOptionReply(option, NBD_REP.INFO, data);
}

/** `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`). */
export function encodeInfoString(option: number, infoType: number, value: string): Uint8Array {
  const s = encodeString(value, "info string");
  const data = new Uint8Array(2 + s.length);
  view(data).setUint16(0, infoType);
  data.set(s, 2);
  return encodeOptionReply(option, NBD_REP.INFO, data);
}

/** `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum payload. */
export function encodeInfoBlockSize(
  option: number,
  minimum: number,
  preferred: number,
  maximum: number,
): Uint8Array {
  const data = new Uint8Array(14);
  const dv = view(data);
  dv.setUint16(0, NBD_INFO.BLOCK_SIZE);
  dv.setUint32(2, u32(minimum, "minimum block size"));
  dv.setUint32(6, u32(preferred, "preferred block size"));
  dv.setUint32(10, u32(maximum, "maximum payload"));
  return encodeOptionReply(option, NBD_REP.INFO, data);
}

/** `NBD_REP_META_CONTEXT`: context id and name. */
export function encodeRepMetaContext(option: number, id: number, name: string): Uint8Array {
  const s = encodeString(name, "context name");
  const data = new Uint8Array(4 + s.length);
  view(data).setUint32(0, u32(id, "context id"));
  data.set(s, 4);
  return encodeOptionReply(option, NBD_REP.META_CONTEXT, data);
}

/** Reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(
  size: number,
  transmissionFlags: number,
  noZeroes: boolean,
): Uint8Array {
  const b = new Uint8Array(noZeroes ? 10 : 134);
  const dv = view(b);
  setU64(dv, 0, size);
  dv.setUint16(8, transmissionFlags);
  return b;
}

// ---- transmission ---------------------------------------------------------------------------------------

/** A transmission request (fields of the 28-byte compact header). */
export interface NbdRequestHeader {
  /** Command flags ({@link NBD_CMD_FLAG}). */
  flags: number;
  /** Command type ({@link NBD_CMD}). */
  type: number;
  /** Opaque 64-bit cookie echoed in the reply. */
  cookie: bigint;
  /** Byte offset (< 2^53). */
  offset: number;
  /** Length in bytes (u32). */
  length: number;
}

/** The 28-byte request header; WRITE data follows it on the wire (written separately). */
export function encodeRequest(req: NbdRequestHeader): Uint8Array {
  const b = new Uint8Array(NBD_REQUEST_SIZE);
  const dv = view(b);
  dv.setUint32(0, NBD_REQUEST_MAGIC);
  dv.setUint16(4, req.flags);
  dv.setUint16(6, req.type);
  dv.setBigUint64(8, req.cookie);
  setU64(dv, 16, req.offset);
  dv.setUint32(24, u32(req.length, "length"));
  return b;
}

/** A 16-byte simple reply header; READ data follows it on success (written separately). */
export function encodeSimpleReply(error: number, cookie: bigint): Uint8Array {
  const b = new Uint8Array(NBD_SIMPLE_REPLY_SIZE);
  encodeSimpleReplyInto(b, error, cookie);
  return b;
}

/** {@link encodeSimpleReply} into the first 16 bytes of `b` (in front of READ data sent in one write). */
export function encodeSimpleReplyInto(b: Uint8Array, error: number, cookie: bigint): void {
  const dv = view(b);
  dv.setUint32(0, NBD_SIMPLE_REPLY_MAGIC);
  dv.setUint32(4, u32(error, "error"));
  dv.setBigUint64(8, cookie);
}

function chunkHeader(b: Uint8Array, flags: number, type: number, cookie: bigint, length: number): DataView {
  const dv = view(b);
  dv.setUint32(0, NBD_STRUCTURED_REPLY_MAGIC);
  dv.setUint16(4, flags);
  dv.setUint16(6, type);
  dv.setBigUint64(8, cookie);
  dv.setUint32(16, u32(length, "chunk length"));
  return dv;
}

/** A structured reply chunk header followed by `payload` (copied: use for small payloads only). */
export function encodeChunk(
  flags: number,
  type: number,
  cookie: bigint,
  payload: Uint8Array = new Uint8Array(0),
): Uint8Array {
  const b = new Uint8Array(NBD_CHUNK_HEADER_SIZE + payload.length);
  chunkHeader(b, flags, type, cookie, payload.length);
  b.set(payload, NBD_CHUNK_HEADER_SIZE);
  return b;
}

/**
 * Header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (chunk header + u64 offset, 28 bytes); the caller
 * writes `dataLength` bytes of data after it.
 */
export function encodeOffsetDataHeader(
  flags: number,
  cookie: bigint,
  offset: number,
  dataLength: number,
): Uint8Array {
  const b = new Uint8Array(NBD_CHUNK_HEADER_SIZE + 8);
  encodeOffsetDataHeaderInto(b, flags, cookie, offset, dataLength);
  return b;
}

/** {@link encodeOffsetDataHeader} into the first 28 bytes of `b` (in front of the data, one write). */
export function encodeOffsetDataHeaderInto(
  b: Uint8Array,
  flags: number,
  cookie: bigint,
  offset: number,
  dataLength: number,
): void {
  const dv = chunkHeader(b, flags, NBD_REPLY_TYPE.OFFSET_DATA, cookie, 8 + dataLength);
  setU64(dv, 20, offset);
}

/** An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (32 bytes). */
export function encodeOffsetHole(flags: number, cookie: bigint, offset: number, size: number): Uint8Array {
  const b = new Uint8Array(NBD_CHUNK_HEADER_SIZE + 12);
  const dv = chunkHeader(b, flags, NBD_REPLY_TYPE.OFFSET_HOLE, cookie, 12);
  setU64(dv, 20, offset);
  dv.setUint32(28, u32(size, "hole size"));
  return b;
}

/** One block-status extent on the wire. */
export interface NbdExtent {
  /** Length in bytes (> 0, u32). */
  length: number;
  /** Context-specific status flags (u32). */
  flags: number;
}

/** An `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context. */
export function encodeBlockStatusChunk(
  flags: number,
  cookie: bigint,
  contextId: number,
  extents: readonly NbdExtent[],
): Uint8Array {
  const len = 4 + 8 * extents.length;
  const b = new Uint8Array(NBD_CHUNK_HEADER_SIZE + len);
  const dv = chunkHeader(b, flags, NBD_REPLY_TYPE.BLOCK_STATUS, cookie, len);
  dv.setUint32(20, u32(contextId, "context id"));
  let off = 24;
  for (const e of extents) {
    dv.setUint32(off, u32(e.length, "extent length"));
    dv.setUint32(off + 4, u32(e.flags, "extent flags"));
    off += 8;
  }
  return b;
}

/**
 * An error chunk: `NBD_REPLY_TYPE_ERROR`, or `NBD_REPLY_TYPE_ERROR_OFFSET` when `offset` is given.
 * The message is cut to fit its u16 length field and the 4096-byte string limit.
 */
export function encodeErrorChunk(
  flags: number,
  cookie: bigint,
  error: number,
  message = "",
  offset?: number,
): Uint8Array {
  let m = utf8.encode(message);
  if (m.length > NBD_MAX_STRING) m = m.subarray(0, NBD_MAX_STRING);
  const len = 6 + m.length + (offset === undefined ? 0 : 8);
  const type = offset === undefined ? NBD_REPLY_TYPE.ERROR : NBD_REPLY_TYPE.ERROR_OFFSET;
  const b = new Uint8Array(NBD_CHUNK_HEADER_SIZE + len);
  const dv = chunkHeader(b, flags, type, cookie, len);
  dv.setUint32(20, u32(error, "error"));
  dv.setUint16(24, m.length);
  b.set(m, 26);
  if (offset !== undefined) setU64(dv, 26 + m.length, offset);
  return b;
}
