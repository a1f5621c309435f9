/**
 * `@blk/drivers/nbd`: the NBD protocol as a sans-IO codec (`protocol/`), and a server exporting any
 * block node (`server/`). The client driver (`client/`) is a later addition.
 */
export * from "./protocol/index.ts";
export * from "./server/index.ts";
