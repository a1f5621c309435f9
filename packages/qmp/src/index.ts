/**
 * QMP for Node: a wire-compatible server and typed client, the command registry, and the QAPI toolkit.
 * Depends on no other @blk package.
 */
export { type ArgsSchema, isQmpError, QMP_ERROR_CLASSES, QmpError, type QmpErrorClass } from "./errors.ts";
export * from "./qapi/index.ts";
export * from "./wire/index.ts";
