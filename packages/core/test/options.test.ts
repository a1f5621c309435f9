import { parseOptionArgument } from "@blk/qmp";
import { describe, expect, it } from "vitest";
import {
  BlkError,
  type BlockDriver,
  BlockGraph,
  CoreBlockdevOptions,
  FilterDriverState,
  MemoryDriver,
  memoryDriver,
  openBlockdev,
} from "../src/index.ts";

/** A raw-like format over its `file` child. */
const raw: BlockDriver<Record<string, unknown>> = {
  format: "raw",
  kind: "format",
  childOptions: [{ name: "file" }],
  async open(_o, ctx) {
    const file = ctx.children.get("file");
    if (file === undefined) throw new BlkError("EINVAL", "Parameter 'file' is missing");
    return new FilterDriverState(file);
  },
};
/** `null-co` stand-in: a memory disk of `size` bytes. */
const nullCo: BlockDriver<{ size?: number }> = {
  format: "null-co",
  kind: "protocol",
  async open(o) {
    return new MemoryDriver({ size: o.size ?? 1 << 30 });
  },
};
const drivers = new Map<string, BlockDriver<never>>([
  ["raw", raw as BlockDriver<never>],
  ["null-co", nullCo as BlockDriver<never>],
  ["x-blk-memory", memoryDriver as BlockDriver<never>],
]);

describe("options layer", () => {
  it("validates with QEMU's wording", async () => {
    const g = new BlockGraph();
    await expect(openBlockdev(g, { driver: "x-blk-memory" }, { drivers })).rejects.toThrow(
      "Parameter 'size' is missing",
    );
    await expect(openBlockdev(g, { driver: "nope" }, { drivers })).rejects.toThrow(
      "Parameter 'driver' does not accept value 'nope'",
    );
    await expect(
      openBlockdev(g, { driver: "x-blk-memory", size: 512, "read-only": "yes" }, { drivers }),
    ).rejects.toThrow("Invalid parameter type for 'read-only', expected: boolean");
    await expect(
      openBlockdev(g, { driver: "x-blk-memory", size: 512, discard: "maybe" }, { drivers }),
    ).rejects.toThrow("Parameter 'discard' does not accept value 'maybe'");
    await expect(
      openBlockdev(g, { driver: "x-blk-memory", size: 512 }, { drivers, requireNodeName: true }),
    ).rejects.toThrow("'node-name' must be specified for the root node");
    await expect(
      openBlockdev(g, { driver: "x-blk-memory", "node-name": "1x", size: 512 }, { drivers }),
    ).rejects.toThrow("Invalid node-name: '1x'");
    await expect(
      openBlockdev(g, { driver: "x-blk-memory", size: 512, "detect-zeroes": "unmap" }, { drivers }),
    ).rejects.toThrow(
      "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
    );
  });

  it("--blockdev keyval and blockdev-add JSON give the same node", async () => {
    const g = new BlockGraph();
    const kv = parseOptionArgument(
      CoreBlockdevOptions,
      "driver=x-blk-memory,node-name=m,size=1M,cache.no-flush=on",
      {
        impliedKey: "driver",
      },
    );
    const a = await openBlockdev(g, kv, { drivers, validate: false });
    const b = await openBlockdev(
      g,
      { driver: "x-blk-memory", "node-name": "n", size: 1048576, cache: { "no-flush": true } },
      { drivers },
    );
    expect(a.length).toBe(1 << 20);
    expect(a.options).toEqual(b.options);
    expect(a.options.cacheNoFlush).toBe(true);
    expect((a.state as MemoryDriver).clusterSize).toBe(65536);
  });

  it("inline children are auto-named, inherit read-only/cache, default to discard=unmap, and go with the parent", async () => {
    const g = new BlockGraph();
    const d = await openBlockdev(
      g,
      {
        driver: "raw",
        "node-name": "d",
        "read-only": true,
        cache: { direct: true },
        file: { driver: "null-co", size: 65536 },
      },
      { drivers },
    );
    const file = d.children.get("file")?.child;
    expect(file?.nodeName).toMatch(/^#block\d{5}$/);
    expect(file?.options).toMatchObject({
      readOnly: true,
      cacheDirect: true,
      discard: "unmap",
      detectZeroes: "off",
    });
    expect(d.options.discard).toBe("ignore");
    expect(d.length).toBe(65536);
    await g.delete(d);
    expect(g.nodes.size).toBe(0);
  });

  it("string references name existing nodes; a missing one fails and leaves nothing behind", async () => {
    const g = new BlockGraph();
    await openBlockdev(g, { driver: "null-co", "node-name": "f", size: 4096 }, { drivers });
    const d = await openBlockdev(g, { driver: "raw", "node-name": "d", file: "f" }, { drivers });
    expect(d.children.get("file")?.child).toBe(g.find("f"));
    await expect(
      openBlockdev(g, { driver: "raw", "node-name": "e", file: "none" }, { drivers }),
    ).rejects.toThrow("Cannot find device='none' nor node-name='none'");
    await expect(
      openBlockdev(
        g,
        { driver: "raw", "node-name": "d", file: { driver: "null-co", size: 4096 } },
        { drivers },
      ),
    ).rejects.toThrow("Duplicate nodes with node-name='d'");
    expect([...g.nodes.keys()].sort()).toEqual(["d", "f"]);
  });

  it("memory nodes with a backing reference build a chain", async () => {
    const g = new BlockGraph();
    const base = await openBlockdev(
      g,
      { driver: "x-blk-memory", "node-name": "base", size: 131072 },
      { drivers },
    );
    await base.write(0, new Uint8Array(512).fill(1));
    const top = await openBlockdev(
      g,
      { driver: "x-blk-memory", "node-name": "top", size: 131072, backing: "base" },
      { drivers },
    );
    expect((await top.read(0, 1))[0]).toBe(1);
    expect((await top.blockStatusAbove(0, 131072))[0]).toMatchObject({ depth: 1, allocated: true });
  });
});
