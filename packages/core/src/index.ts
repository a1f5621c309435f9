/** The blk block-node core. */
export { BlkError, type BlkErrorCode, type BlkErrorOptions, ERRNO, isBlkError, toBlkError } from "./errors.ts";
