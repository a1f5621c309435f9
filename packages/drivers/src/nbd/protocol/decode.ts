/**
 * Pure decoders of NBD option data, option reply data and structured chunk payloads. They validate
 * every length field against the bytes actually present and the 4096-byte string limit, and throw
 * {@link NbdProtocolError} (reason `BAD_LENGTH` / `TOO_LONG` / `BAD_VALUE`) with the failing field named.
 * A server turns such an error in option data into `NBD_REP_ERR_INVALID` and carries on.
 *
 * References: NetworkBlockDevice/nbd `doc/proto.md` — "Option types" (`NBD_OPT_INFO`, `NBD_OPT_GO`,
 * `NBD_OPT_*_META_CONTEXT`), "Option reply types", "Structured reply types".
 */
import type { BlkErrorCode } from "@blk/core";
import { rd16, rd32, rd64 } from "./bytes.ts";
import { NBD_ERR, NBD_INFO, NBD_MAX_STRING, NBD_REPLY_TYPE } from "./constants.ts";
import type { NbdExtent } from "./encode.ts";
import { NbdProtocolError } from "./errors.ts";

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Decodes a protocol string (UTF-8, no NUL, ≤ 4096 bytes). @throws {NbdProtocolError} */
export function decodeString(b: Uint8Array, what = "string"): string {
  if (b.length > NBD_MAX_STRING) {
    throw new NbdProtocolError("TOO_LONG", `${what} is ${b.length} bytes, longer than ${NBD_MAX_STRING}`);
  }
  let s: string;
  try {
    s = utf8.decode(b);
  } catch (e) {
    throw new NbdProtocolError("BAD_VALUE", `${what} is not valid UTF-8`, { cause: e });
  }
  if (s.includes("\0")) throw new NbdProtocolError("BAD_VALUE", `${what} contains NUL`);
  return s;
}

function need(data: Uint8Array, end: number, what: string): void {
  if (end > data.length) {
    throw new NbdProtocolError(
      "BAD_LENGTH",
      `${what} runs past the end of the data (${end} > ${data.length})`,
    );
  }
}

/** Data of `NBD_OPT_INFO` / `NBD_OPT_GO`. */
export interface NbdInfoRequest {
  name: string;
  /** Info types asked for (`NBD_INFO_*`). */
  infos: number[];
}

/** Decodes `NBD_OPT_INFO` / `NBD_OPT_GO` data. @throws {NbdProtocolError} */
export function decodeInfoRequest(data: Uint8Array): NbdInfoRequest {
  need(data, 6, "info request");
  const nameLen = rd32(data, 0);
  if (nameLen > data.length - 6) {
    throw new NbdProtocolError(
      "BAD_LENGTH",
      `export name length ${nameLen} exceeds the option length ${data.length} - 6`,
    );
  }
  const name = decodeString(data.subarray(4, 4 + nameLen), "export name");
  const count = rd16(data, 4 + nameLen);
  const end = 6 + nameLen + 2 * count;
  if (end !== data.length) {
    throw new NbdProtocolError(
      "BAD_LENGTH",
      `info request with ${count} types needs ${end} bytes, got ${data.length}`,
    );
  }
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(rd16(data, 6 + nameLen + 2 * i));
  return { name, infos };
}

/** Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`. */
export interface NbdMetaContextRequest {
  name: string;
  queries: string[];
}

/** Decodes `NBD_OPT_*_META_CONTEXT` data. @throws {NbdProtocolError} */
export function decodeMetaContextRequest(data: Uint8Array): NbdMetaContextRequest {
  need(data, 4, "meta context request");
  const nameLen = rd32(data, 0);
  need(data, 4 + nameLen + 4, "export name");
  const name = decodeString(data.subarray(4, 4 + nameLen), "export name");
  let off = 4 + nameLen;
  const count = rd32(data, off);
  off += 4;
  // Each query takes at least 4 bytes: refuse impossible counts before looping.
  if (count > (data.length - off) / 4) {
    throw new NbdProtocolError("BAD_LENGTH", `${count} queries cannot fit in ${data.length - off} bytes`);
  }
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    need(data, off + 4, "query length");
    const len = rd32(data, off);
    need(data, off + 4 + len, "query");
    queries.push(decodeString(data.subarray(off + 4, off + 4 + len), "context query"));
    off += 4 + len;
  }
  if (off !== data.length) {
    throw new NbdProtocolError("BAD_LENGTH", `${data.length - off} bytes left after the last query`);
  }
  return { name, queries };
}

/** Decodes `NBD_REP_SERVER` data. @throws {NbdProtocolError} */
export function decodeRepServer(data: Uint8Array): { name: string; description: string } {
  need(data, 4, "server reply");
  const len = rd32(data, 0);
  need(data, 4 + len, "export name");
  return {
    name: decodeString(data.subarray(4, 4 + len), "export name"),
    description: decodeString(data.subarray(4 + len), "description"),
  };
}

/** One decoded `NBD_REP_INFO`. */
export type NbdInfo =
  | { type: 0; size: number; transmissionFlags: number }
  | { type: 1; name: string }
  | { type: 2; description: string }
  | { type: 3; minimum: number; preferred: number; maximum: number }
  | { type: number; data: Uint8Array; unknown: true };

/** Decodes `NBD_REP_INFO` data (unknown types are returned raw, to be ignored). @throws {NbdProtocolError} */
export function decodeRepInfo(data: Uint8Array): NbdInfo {
  need(data, 2, "info reply");
  const type = rd16(data, 0);
  switch (type) {
    case NBD_INFO.EXPORT: {
      if (data.length !== 12)
        throw new NbdProtocolError("BAD_LENGTH", `NBD_INFO_EXPORT of ${data.length} bytes, expected 12`);
      const size = rd64(data, 2);
      if (!Number.isSafeInteger(size))
        throw new NbdProtocolError("BAD_VALUE", `export size ${size} is not below 2^53`);
      return { type: 0, size, transmissionFlags: rd16(data, 10) };
    }
    case NBD_INFO.NAME:
      return { type: 1, name: decodeString(data.subarray(2), "export name") };
    case NBD_INFO.DESCRIPTION:
      return { type: 2, description: decodeString(data.subarray(2), "description") };
    case NBD_INFO.BLOCK_SIZE:
      if (data.length !== 14)
        throw new NbdProtocolError("BAD_LENGTH", `NBD_INFO_BLOCK_SIZE of ${data.length} bytes, expected 14`);
      return { type: 3, minimum: rd32(data, 2), preferred: rd32(data, 6), maximum: rd32(data, 10) };
    default:
      return { type, data: data.subarray(2), unknown: true };
  }
}

/** Decodes `NBD_REP_META_CONTEXT` data. @throws {NbdProtocolError} */
export function decodeRepMetaContext(data: Uint8Array): { id: number; name: string } {
  need(data, 4, "meta context reply");
  return { id: rd32(data, 0), name: decodeString(data.subarray(4), "context name") };
}

/** Decodes an `NBD_REPLY_TYPE_OFFSET_DATA` payload (the data is a view). @throws {NbdProtocolError} */
export function decodeOffsetData(payload: Uint8Array): { offset: number; data: Uint8Array } {
  if (payload.length < 9)
    throw new NbdProtocolError("BAD_LENGTH", `OFFSET_DATA chunk of ${payload.length} bytes, expected ≥ 9`);
  const offset = rd64(payload, 0);
  if (!Number.isSafeInteger(offset))
    throw new NbdProtocolError("BAD_VALUE", `chunk offset ${offset} is not below 2^53`);
  return { offset, data: payload.subarray(8) };
}

/** Decodes an `NBD_REPLY_TYPE_OFFSET_HOLE` payload. @throws {NbdProtocolError} */
export function decodeOffsetHole(payload: Uint8Array): { offset: number; size: number } {
  if (payload.length !== 12)
    throw new NbdProtocolError("BAD_LENGTH", `OFFSET_HOLE chunk of ${payload.length} bytes, expected 12`);
  const offset = rd64(payload, 0);
  if (!Number.isSafeInteger(offset))
    throw new NbdProtocolError("BAD_VALUE", `chunk offset ${offset} is not below 2^53`);
  const size = rd32(payload, 8);
  if (size === 0) throw new NbdProtocolError("BAD_VALUE", "OFFSET_HOLE chunk of size 0");
  return { offset, size };
}

/** Decodes an `NBD_REPLY_TYPE_BLOCK_STATUS` payload. @throws {NbdProtocolError} */
export function decodeBlockStatus(payload: Uint8Array): { contextId: number; extents: NbdExtent[] } {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) {
    throw new NbdProtocolError(
      "BAD_LENGTH",
      `BLOCK_STATUS chunk of ${payload.length} bytes is not 4 + 8k (k ≥ 1)`,
    );
  }
  const extents: NbdExtent[] = [];
  for (let off = 4; off < payload.length; off += 8) {
    extents.push({ length: rd32(payload, off), flags: rd32(payload, off + 4) });
  }
  return { contextId: rd32(payload, 0), extents };
}

/** A decoded error chunk. */
export interface NbdErrorChunk {
  error: number;
  message: string;
  /** Present for `NBD_REPLY_TYPE_ERROR_OFFSET`. */
  offset?: number;
}

/** Decodes an error chunk payload (`type` with bit 15 set). @throws {NbdProtocolError} */
export function decodeErrorChunk(type: number, payload: Uint8Array): NbdErrorChunk {
  need(payload, 6, "error chunk");
  const error = rd32(payload, 0);
  const len = rd16(payload, 4);
  need(payload, 6 + len, "error message");
  const message = decodeString(payload.subarray(6, 6 + len), "error message");
  if (type === NBD_REPLY_TYPE.ERROR_OFFSET) {
    if (payload.length !== 14 + len)
      throw new NbdProtocolError("BAD_LENGTH", "ERROR_OFFSET chunk length mismatch");
    return { error, message, offset: rd64(payload, 6 + len) };
  }
  return { error, message };
}

/**
 * Maps a {@link BlkErrorCode} to the NBD wire error (the mapping QEMU's server applies to host errno):
 * EPERM/EROFS → EPERM, EIO → EIO, ENOMEM → ENOMEM, ENOSPC/EFBIG → ENOSPC, EOVERFLOW → EOVERFLOW,
 * ENOTSUP → ENOTSUP, ESHUTDOWN → ESHUTDOWN, everything else → EINVAL.
 */
export function nbdErrno(code: BlkErrorCode): number {
  return TO_NBD[code] ?? NBD_ERR.EINVAL;
}

const TO_NBD: Partial<Record<BlkErrorCode, number>> = {
  EPERM: NBD_ERR.EPERM,
  EROFS: NBD_ERR.EPERM,
  EIO: NBD_ERR.EIO,
  ENOMEM: NBD_ERR.ENOMEM,
  ENOSPC: NBD_ERR.ENOSPC,
  EFBIG: NBD_ERR.ENOSPC,
  EOVERFLOW: NBD_ERR.EOVERFLOW,
  ENOTSUP: NBD_ERR.ENOTSUP,
  ESHUTDOWN: NBD_ERR.ESHUTDOWN,
};

/** Maps an NBD wire error to a {@link BlkErrorCode} (unknown values are EINVAL, as the spec asks). */
export function blkErrorCodeOfNbd(errno: number): BlkErrorCode {
  switch (errno) {
    case NBD_ERR.EPERM:
      return "EPERM";
    case NBD_ERR.EIO:
      return "EIO";
    case NBD_ERR.ENOMEM:
      return "ENOMEM";
    case NBD_ERR.ENOSPC:
      return "ENOSPC";
    case NBD_ERR.EOVERFLOW:
      return "EOVERFLOW";
    case NBD_ERR.ENOTSUP:
      return "ENOTSUP";
    case NBD_ERR.ESHUTDOWN:
      return "ESHUTDOWN";
    default:
      return "EINVAL";
  }
}
