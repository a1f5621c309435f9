import { writeFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { generic, startSession } from "./helpers.ts";

const MiB = 1 << 20;

describe("control commands", () => {
  it("query-version, query-commands, greeting", async () => {
    await using s = await startSession();
    expect(s.qmp.greeting.version.qemu).toEqual({ major: 7, minor: 2, micro: 0 });
    expect(s.qmp.greeting.version.package).toMatch(/^blk \d+\.\d+\.\d+/);
    const v = await s.qmp.execute<{ qemu: unknown; package: string }>("query-version");
    expect(v.qemu).toEqual({ major: 7, minor: 2, micro: 0 });
    const names = (await s.qmp.execute<{ name: string }[]>("query-commands")).map((c) => c.name);
    for (const c of [
      "qmp_capabilities",
      "quit",
      "blockdev-add",
      "blockdev-del",
      "query-named-block-nodes",
      "block-dirty-bitmap-merge",
      "object-add",
      "qom-set",
      "query-jobs",
      "block-job-set-speed",
      "nbd-server-start",
      "block-export-del",
      "query-block-exports",
    ])
      expect(names).toContain(c);
    const schema =
      await s.qmp.execute<{ name: string; "meta-type": string; "arg-type"?: string }[]>("query-qmp-schema");
    const add = schema.find((e) => e.name === "blockdev-add");
    expect(add).toMatchObject({ "meta-type": "command", "allow-oob": false });
    const argType = schema.find((e) => e.name === add?.["arg-type"]);
    expect(argType).toMatchObject({ "meta-type": "object" });
    expect(schema.find((e) => e.name === "BLOCK_EXPORT_DELETED")).toMatchObject({ "meta-type": "event" });
    expect(await s.error("no-such-command")).toEqual({
      class: "CommandNotFound",
      desc: "The command no-such-command has not been found",
    });
    expect(await s.error("qmp_capabilities")).toEqual({
      class: "CommandNotFound",
      desc: "Capabilities negotiation is already complete, command ignored",
    });
  });

  it("quit removes exports first, then the daemon asks to shut down", async () => {
    await using s = await startSession();
    await s.qmp.execute("blockdev-add", { driver: "null-co", "node-name": "n" });
    await s.qmp.execute("nbd-server-start", { addr: { type: "unix", data: { path: s.dir.join("n.sock") } } });
    await s.qmp.execute("block-export-add", { type: "nbd", id: "e0", "node-name": "n" });
    const mark = s.qmp.eventMark();
    await s.qmp.execute("quit");
    const ev = await s.qmp.waitEvent("BLOCK_EXPORT_DELETED", { since: mark });
    expect(ev.data).toEqual({ id: "e0" });
    await expect(s.daemon.shutdownRequested).resolves.toBe("quit");
  });
});

describe("blockdev-add / blockdev-del (transcripts §8)", () => {
  it("schema validation errors", async () => {
    await using s = await startSession();
    const a = s.dir.join("a.img");
    writeFileSync(a, Buffer.alloc(MiB));
    expect(await s.error("blockdev-add", { driver: "raw", "node-name": "a" })).toEqual(
      generic("Parameter 'file' is missing"),
    );
    expect(await s.error("blockdev-add", { driver: "raw", file: { driver: "file", filename: a } })).toEqual(
      generic("'node-name' must be specified for the root node"),
    );
    expect(await s.error("blockdev-add", { driver: "nosuch", "node-name": "x" })).toEqual(
      generic("Parameter 'driver' does not accept value 'nosuch'"),
    );
    expect(
      await s.error("blockdev-add", {
        driver: "file",
        "node-name": "x",
        filename: a,
        cache: { direct: "on" },
      }),
    ).toEqual(generic("Invalid parameter type for 'cache.direct', expected: boolean"));
    expect(await s.error("blockdev-add", { driver: "file", "node-name": "1x", filename: a })).toEqual(
      generic("Invalid node-name: '1x'"),
    );
    expect(
      await s.error("blockdev-add", { driver: "file", "node-name": "x", filename: a, bogus: 1 }),
    ).toEqual(generic("Parameter 'bogus' is unexpected"));
    expect(await s.error("query-jobs", { unexpected: true })).toEqual(
      generic("Parameter 'unexpected' is unexpected"),
    );
    expect(
      await s.error("blockdev-add", { driver: "file", "node-name": "x", filename: s.dir.join("nope") }),
    ).toEqual(generic(`Could not open '${s.dir.join("nope")}': No such file or directory`));
    expect(await s.qmp.execute("query-named-block-nodes")).toEqual([]);
  });

  it("lifecycle: duplicates, references, ownership, in use", async () => {
    await using s = await startSession();
    const a = s.dir.join("a.img");
    writeFileSync(a, Buffer.alloc(MiB));
    await s.qmp.execute("blockdev-add", {
      driver: "raw",
      "node-name": "a",
      file: { driver: "file", "node-name": "a-file", filename: a },
    });
    expect(
      await s.error("blockdev-add", {
        driver: "raw",
        "node-name": "a",
        file: { driver: "file", filename: a },
      }),
    ).toEqual(generic("Duplicate nodes with node-name='a'"));
    await s.qmp.execute("blockdev-add", { driver: "raw", "node-name": "r", file: "a-file" });
    expect(await s.error("blockdev-add", { driver: "raw", "node-name": "r2", file: "nosuch" })).toEqual(
      generic("Cannot find device='nosuch' nor node-name='nosuch'"),
    );
    await s.qmp.execute("blockdev-add", { driver: "null-co", "node-name": "n" });
    await s.qmp.execute("blockdev-add", {
      driver: "null-co",
      "node-name": "n2",
      size: MiB,
      "read-zeroes": true,
    });
    expect(await s.error("blockdev-del", { "node-name": "a-file" })).toEqual(
      generic("Node a-file is not owned by the monitor"),
    );
    expect(await s.error("blockdev-del", { "node-name": "nosuch" })).toEqual(
      generic("Failed to find node with node-name='nosuch'"),
    );
    await s.qmp.execute("nbd-server-start", {
      addr: { type: "unix", data: { path: s.dir.join("nbd.sock") } },
    });
    expect(
      await s.error("nbd-server-start", { addr: { type: "unix", data: { path: s.dir.join("x.sock") } } }),
    ).toEqual(generic("NBD server already running"));
    await s.qmp.execute("block-export-add", { type: "nbd", id: "e", "node-name": "n" });
    expect(await s.error("block-export-add", { type: "nbd", id: "e", "node-name": "n" })).toEqual(
      generic("Block export id 'e' is already in use"),
    );
    expect(await s.error("blockdev-del", { "node-name": "n" })).toEqual(generic("Node n is in use"));
    const mark = s.qmp.eventMark();
    await s.qmp.execute("block-export-del", { id: "e" });
    expect((await s.qmp.waitEvent("BLOCK_EXPORT_DELETED", { since: mark })).data).toEqual({ id: "e" });
    expect(await s.error("block-export-del", { id: "e" })).toEqual(generic("Export 'e' is not found"));
    await s.qmp.execute("blockdev-del", { "node-name": "n" });
    expect(await s.qmp.execute("query-block")).toEqual([]);
    const nodes = await s.qmp.execute<Record<string, unknown>[]>("query-named-block-nodes");
    expect(nodes.map((n) => n["node-name"])).toEqual(["n2", "r", "a", "a-file"]);
    const n2 = nodes[0] as Record<string, unknown>;
    expect(n2).toMatchObject({
      drv: "null-co",
      ro: false,
      encrypted: false,
      detect_zeroes: "off",
      backing_file_depth: 0,
      write_threshold: 0,
      bps: 0,
      iops_wr: 0,
      cache: { writeback: true, direct: false, "no-flush": false },
      image: { "virtual-size": MiB, format: "null-co", "actual-size": 0 },
    });
    // exactly as transcripts §8 (QEMU's QDict key order and spacing)
    expect(n2.file).toBe('json:{"read-zeroes": true, "driver": "null-co", "size": 1048576}');
    const r = nodes[1] as { image: Record<string, unknown>; file: string };
    expect(r.file).toBe(a);
    expect(r.image).toMatchObject({ filename: a, format: "raw", "virtual-size": MiB, "dirty-flag": false });
    expect(nodes[3]).toMatchObject({ drv: "file", image: { format: "file", "virtual-size": MiB } });
    // "r" uses a-file too: deleting "a" leaves a-file alive (it still has a parent)
    await s.qmp.execute("blockdev-del", { "node-name": "a" });
    expect(await s.error("blockdev-del", { "node-name": "a-file" })).toEqual(
      generic("Node a-file is not owned by the monitor"),
    );
    await s.qmp.execute("blockdev-del", { "node-name": "r" });
    const left = await s.qmp.execute<Record<string, unknown>[]>("query-named-block-nodes", { flat: true });
    expect(left.map((n) => n["node-name"])).toEqual(["n2"]);
  });

  it("x-debug-query-block-graph, block_resize, query-blockstats", async () => {
    await using s = await startSession();
    const a = s.dir.join("a.img");
    writeFileSync(a, Buffer.alloc(MiB));
    await s.qmp.execute("blockdev-add", {
      driver: "raw",
      "node-name": "r",
      file: { driver: "file", "node-name": "f", filename: a },
    });
    const g = await s.qmp.execute<{ nodes: { name: string; type: string; id: number }[]; edges: unknown[] }>(
      "x-debug-query-block-graph",
    );
    expect(g.nodes.map((n) => [n.name, n.type]).sort()).toEqual([
      ["f", "block-driver"],
      ["r", "block-driver"],
    ]);
    expect(g.edges).toHaveLength(1);
    expect(g.edges[0]).toMatchObject({ name: "file" });

    await s.qmp.execute("block_resize", { "node-name": "r", size: 2 * MiB });
    const nodes =
      await s.qmp.execute<{ "node-name": string; image: { "virtual-size": number } }[]>(
        "query-named-block-nodes",
      );
    expect(nodes.find((n) => n["node-name"] === "r")?.image["virtual-size"]).toBe(2 * MiB);
    expect(await s.error("block_resize", { "node-name": "nosuch", size: MiB })).toEqual(
      generic("Cannot find device='' nor node-name='nosuch'"),
    );
    expect(await s.error("block_resize", { size: MiB })).toEqual(
      generic("Cannot find device='' nor node-name=''"),
    );
    expect(await s.error("block_resize", { "node-name": "r", size: -1 })).toEqual(
      generic("Parameter 'size' expects a >0 size"),
    );
    expect(await s.error("block_resize", { "node-name": "r", size: "big" })).toEqual(
      generic("Invalid parameter type for 'size', expected: integer"),
    );

    expect(await s.qmp.execute("query-blockstats")).toEqual([]);
    const stats = await s.qmp.execute<
      { "node-name": string; stats: Record<string, unknown>; parent?: unknown }[]
    >("query-blockstats", { "query-nodes": true });
    expect(stats.map((x) => x["node-name"])).toEqual(["r", "f"]);
    expect(stats[0]?.stats).toMatchObject({ rd_bytes: 0, wr_operations: 0, timed_stats: [] });
    expect(stats[0]?.parent).toMatchObject({ "node-name": "f" });
  });
});
