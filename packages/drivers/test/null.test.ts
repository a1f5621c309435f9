import { BlockGraph } from "@blk/core";
import { describe, expect, it } from "vitest";
import { NULL_DEFAULT_SIZE, type NullState, nullDriver, nullSchema } from "../src/null/index.ts";

describe("null-co", () => {
  it("has QEMU's default size, drops writes and reads zeroes with read-zeroes", async () => {
    const graph = new BlockGraph();
    const node = await graph.open(nullDriver, { "read-zeroes": true });
    expect(node.length).toBe(NULL_DEFAULT_SIZE);
    await node.write(0, new Uint8Array(512).fill(7));
    expect((await node.read(0, 512)).every((b) => b === 0)).toBe(true);
    expect(await node.blockStatus(0, 4096)).toMatchObject([
      { offset: 0, length: 4096, zero: true, data: false },
    ]);
    await graph.delete(node);
  });

  it("leaves read buffers untouched without read-zeroes, and honours size", async () => {
    const graph = new BlockGraph();
    const node = await graph.open(nullDriver, { size: 65536 });
    expect(node.length).toBe(65536);
    const buf = new Uint8Array(16).fill(9);
    await node.state.read(0, buf);
    expect(buf.every((b) => b === 9)).toBe(true);
    await graph.delete(node);
  });

  it("delays requests by latency-ns", async () => {
    const graph = new BlockGraph();
    const node = await graph.open(nullDriver, { size: 4096, "latency-ns": 20_000_000 });
    expect((node.state as NullState).latencyNs).toBe(20_000_000);
    const t0 = performance.now();
    await node.read(0, 512);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(15);
    await graph.delete(node);
  });

  it("validates options with QEMU's wording", () => {
    expect(() => nullSchema.parse({ size: "x" })).toThrow(
      "Invalid parameter type for 'size', expected: integer",
    );
    expect(() => nullSchema.parse({ "read-zeroes": 1 })).toThrow(
      "Invalid parameter type for 'read-zeroes', expected: boolean",
    );
    expect(() => nullSchema.parse({ foo: 1 })).toThrow("Parameter 'foo' is unexpected");
  });
});
