/** QMP for Node: wire-compatible server and typed client, command registry, and a QAPI toolkit (schemas, QEMU-worded validation, keyval parser). */
export {};
