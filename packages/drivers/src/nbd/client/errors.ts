/**
 * Error helpers of the NBD client: wire errno and option error replies to {@link BlkError}s, and the
 * connection-level failure every pending request gets when the connection dies.
 */
import { BlkError, type BlkErrorCode, strerror } from "@blk/core";
import { blkErrorCodeOfNbd, NBD_REP, optionName } from "../protocol/index.ts";

/**
 * The per-request error for an NBD wire error value (unknown values are EINVAL, as the spec asks); the
 * server's message when it sent one, else the errno's text.
 */
export function requestError(errno: number, message: string, offset?: number): BlkError {
  const code = blkErrorCodeOfNbd(errno);
  const text = message === "" ? strerror(code) : message;
  return new BlkError(code, text, offset === undefined ? {} : { offset });
}

/** A handshake option refused by the server (`NBD_REP_ERR_*`), with the server's message when present. */
export function optionError(option: number, type: number, serverMessage: string): BlkError {
  const name = optionName(option);
  let code: BlkErrorCode = "EINVAL";
  let text: string;
  switch (type) {
    case NBD_REP.ERR_UNKNOWN:
      code = "ENOENT";
      text = "Requested export not available";
      break;
    case NBD_REP.ERR_TLS_REQD:
      // QEMU's words (nbd/client.c), with the server's message on a line of its own.
      code = "EPERM";
      text = `TLS negotiation required before option ${option} (${name})\nDid you forget a valid tls-creds?`;
      return new BlkError(code, serverMessage === "" ? text : `${text}\nserver reported: ${serverMessage}`);
    case NBD_REP.ERR_POLICY:
      code = "EPERM";
      text = `Server denied option '${name}' by policy`;
      break;
    case NBD_REP.ERR_UNSUP:
    case NBD_REP.ERR_PLATFORM:
      code = "ENOTSUP";
      text = `Server does not support option '${name}'`;
      break;
    case NBD_REP.ERR_SHUTDOWN:
      code = "ESHUTDOWN";
      text = "Server is shutting down";
      break;
    case NBD_REP.ERR_INVALID:
      text = `Server found option '${name}' invalid`;
      break;
    case NBD_REP.ERR_BLOCK_SIZE_REQD:
      text = "Server requires block size negotiation";
      break;
    case NBD_REP.ERR_TOO_BIG:
      text = `Option '${name}' is too big for the server`;
      break;
    default:
      text = `Server refused option '${name}' with error 0x${type.toString(16)}`;
  }
  return new BlkError(code, serverMessage === "" ? text : `${text}: ${serverMessage}`);
}

/** The error pending and later requests get once the connection is gone. */
export function connectionLost(message: string, cause?: unknown): BlkError {
  return new BlkError("EIO", message, cause === undefined ? {} : { cause });
}
