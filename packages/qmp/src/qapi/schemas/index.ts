/** The starter set of real QAPI schemas: block-layer options and socket addresses. */
export * from "./block.ts";
export * from "./export.ts";
export * from "./socket.ts";
