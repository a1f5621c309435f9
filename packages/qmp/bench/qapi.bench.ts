/**
 * Validation throughput of the QAPI toolkit on a realistic `blockdev-add`: the JSON visitor, the keyval parser,
 * and keyval parser + visitor together. The expected outputs are asserted before anything is timed.
 */
import { deepStrictEqual } from "node:assert/strict";
import { bench, describe } from "vitest";
import { BlockdevOptions, parseKeyval, parseOptionArgument } from "../src/index.ts";

const JSON_INPUT = {
  driver: "qcow2",
  "node-name": "disk",
  discard: "unmap",
  cache: { direct: true },
  file: { driver: "file", filename: "/tmp/qsd/disk.qcow2", aio: "native" },
  backing: {
    driver: "raw",
    file: { driver: "nbd", server: { type: "unix", path: "/tmp/nbd.sock" }, export: "base" },
  },
};
const KEYVAL_INPUT =
  "driver=qcow2,node-name=disk,discard=unmap,cache.direct=on,file.driver=file,file.filename=/tmp/qsd/disk.qcow2," +
  "file.aio=native,backing.driver=raw,backing.file.driver=nbd,backing.file.server.type=unix," +
  "backing.file.server.path=/tmp/nbd.sock,backing.file.export=base";

const expected = BlockdevOptions.parse(JSON_INPUT);
deepStrictEqual(parseOptionArgument(BlockdevOptions, KEYVAL_INPUT), expected);
deepStrictEqual(BlockdevOptions.parseKeyval(parseKeyval(KEYVAL_INPUT)), expected);

describe("blockdev-add validation", () => {
  bench("JSON visitor (BlockdevOptions.parse)", () => {
    BlockdevOptions.parse(JSON_INPUT);
  });
  bench("keyval parser only (parseKeyval)", () => {
    parseKeyval(KEYVAL_INPUT);
  });
  bench("keyval parser + visitor (parseOptionArgument)", () => {
    parseOptionArgument(BlockdevOptions, KEYVAL_INPUT);
  });
  bench("JSON visitor, failing at a nested member", () => {
    try {
      BlockdevOptions.parse({ ...JSON_INPUT, file: { driver: "file", filename: 7 } });
    } catch {
      // QmpError expected
    }
  });
});
