// blockdev-snapshot-sync and blockdev-snapshot: the overlay takes over the node's parents, reads fall
// through to the old node, an overlay nobody uses goes away at once (as qsd 7.2, spec §3 transcript), and
// QEMU's error messages.
import { existsSync, writeFileSync } from "node:fs";
import { backendParent, PERM } from "@blk/core";
import { createQcow2 } from "@blk/drivers/qcow2";
import { expect, it } from "vitest";
import { generic, startSession } from "./helpers.ts";

const MiB = 1 << 20;

async function session() {
  const s = await startSession({ log: () => {} });
  const base = s.dir.join("disk.qcow2");
  await createQcow2({ filename: base, size: 8 * MiB });
  await s.qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "disk",
    file: { driver: "file", filename: base },
  });
  return s;
}

interface GraphInfo {
  nodes: { id: number; name: string; type: string }[];
  edges: { parent: number; child: number; name: string }[];
}

/** `parent --name--> child` lines of x-debug-query-block-graph, by node name. */
async function edges(qmp: { execute(c: string): Promise<unknown> }): Promise<string[]> {
  const g = (await qmp.execute("x-debug-query-block-graph")) as GraphInfo;
  const name = (id: number) => {
    const n = g.nodes.find((x) => x.id === id);
    return n?.type === "block-backend" ? "<backend>" : (n?.name ?? "?");
  };
  return g.edges
    .filter((e) => !name(e.child).startsWith("#"))
    .map((e) => `${name(e.parent)} -${e.name}-> ${name(e.child)}`)
    .sort();
}

it("blockdev-snapshot-sync of a node without parents creates the file, and the overlay goes away (qsd 7.2)", async () => {
  await using s = await session();
  const ov1 = s.dir.join("disk-ov1.qcow2");
  expect(
    await s.qmp.execute("blockdev-snapshot-sync", {
      "node-name": "disk",
      "snapshot-file": ov1,
      "snapshot-node-name": "ov1",
      format: "qcow2",
    }),
  ).toEqual({});
  expect(existsSync(ov1)).toBe(true);
  await s.qmp
    .execute("blockdev-add", {
      driver: "qcow2",
      "node-name": "ov2",
      backing: null,
      file: { driver: "file", filename: s.dir.join("ov.qcow2") },
    })
    .catch(() => {});
  expect(await s.error("blockdev-snapshot", { node: "ov1", overlay: "ov2" })).toEqual(
    generic("Cannot find device='ov1' nor node-name='ov1'"),
  );
});

it("the overlay takes over the parents; blockdev-snapshot stacks a second one; reads fall through", async () => {
  await using s = await session();
  const { daemon, qmp } = s;
  const disk = daemon.graph.find("disk");
  if (disk === undefined) throw new Error("no disk");
  const vm = daemon.graph.attach(backendParent(), disk, {
    name: "root",
    perm: PERM.WRITE | PERM.CONSISTENT_READ,
  });
  await vm.write(0, new Uint8Array(65536).fill(0x11));
  await qmp.execute("blockdev-snapshot-sync", {
    "node-name": "disk",
    "snapshot-file": s.dir.join("disk-ov1.qcow2"),
    "snapshot-node-name": "ov1",
  });
  expect(vm.child.nodeName).toBe("ov1");
  await vm.write(65536, new Uint8Array(65536).fill(0x22));
  expect((await vm.read(0, 1))[0]).toBe(0x11);
  expect(await edges(qmp)).toEqual(["<backend> -root-> ov1", "ov1 -backing-> disk"]);

  await createQcow2({ filename: s.dir.join("ov.qcow2"), size: 8 * MiB });
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "ov2",
    backing: null,
    file: { driver: "file", filename: s.dir.join("ov.qcow2") },
  });
  expect(await qmp.execute("blockdev-snapshot", { node: "ov1", overlay: "ov2" })).toEqual({});
  expect(vm.child.nodeName).toBe("ov2");
  expect(await edges(qmp)).toEqual(["<backend> -root-> ov2", "ov1 -backing-> disk", "ov2 -backing-> ov1"]);
  expect((await vm.read(0, 1))[0]).toBe(0x11);
  expect((await vm.read(65536, 1))[0]).toBe(0x22);
  await vm.write(2 * 65536, new Uint8Array(65536).fill(0x33));
  expect((await vm.read(2 * 65536, 1))[0]).toBe(0x33);
  const nodes = (await qmp.execute("query-named-block-nodes")) as {
    "node-name": string;
    ro: boolean;
    backing_file_depth: number;
  }[];
  const byName = new Map(nodes.map((n) => [n["node-name"], n]));
  expect(byName.get("ov2")).toMatchObject({ ro: false, backing_file_depth: 2 });
  // qsd 7.2 shows ov1 and disk read-only now; blk keeps qcow2 nodes read-write until its qcow2 driver state
  // can reopen (store bitmaps, clear the dirty bit) — see snapshots.ts.
  expect(byName.get("ov1")).toMatchObject({ backing_file_depth: 1 });
  expect(byName.get("disk")).toMatchObject({ backing_file_depth: 0 });
  vm.detach();
});

it("refuses with QEMU's messages", async () => {
  await using s = await session();
  const { qmp } = s;
  const file = s.dir.join("x.qcow2");
  expect(await s.error("blockdev-snapshot-sync", { "node-name": "nope", "snapshot-file": file })).toEqual(
    generic("Cannot find device='' nor node-name='nope'"),
  );
  expect(await s.error("blockdev-snapshot-sync", { device: "nope", "snapshot-file": file })).toEqual(
    generic("Cannot find device='nope' nor node-name=''"),
  );
  expect(await s.error("blockdev-snapshot-sync", { "node-name": "disk", "snapshot-file": file })).toEqual(
    generic("New overlay node-name missing"),
  );
  expect(
    await s.error("blockdev-snapshot-sync", {
      "node-name": "disk",
      "snapshot-file": file,
      "snapshot-node-name": "disk",
    }),
  ).toEqual(generic("New overlay node-name already in use"));
  expect(await s.error("blockdev-snapshot-sync", { "snapshot-file": file })).toEqual(
    generic("Cannot find device='' nor node-name=''"),
  );
  expect(
    await s.error("blockdev-snapshot-sync", { "node-name": "disk", "snapshot-file": file, mode: "bogus" }),
  ).toEqual(generic("Parameter 'mode' does not accept value 'bogus'"));
  expect(existsSync(file)).toBe(false);

  await createQcow2({ filename: s.dir.join("o.qcow2"), size: 8 * MiB });
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "o",
    backing: "disk",
    file: { driver: "file", filename: s.dir.join("o.qcow2") },
  });
  await createQcow2({ filename: s.dir.join("p.qcow2"), size: 8 * MiB });
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "p",
    backing: null,
    file: { driver: "file", filename: s.dir.join("p.qcow2") },
  });
  expect(await s.error("blockdev-snapshot", { node: "nope", overlay: "p" })).toEqual(
    generic("Cannot find device='nope' nor node-name='nope'"),
  );
  // A backing node is blocked for snapshots before anything else is looked at (qsd 7.2).
  for (const overlay of ["nope", "o", "p"])
    expect(await s.error("blockdev-snapshot", { node: "disk", overlay })).toEqual(
      generic("Node 'disk' is busy: node is used as backing hd of 'o'"),
    );
  expect(
    await s.error("blockdev-snapshot-sync", {
      "node-name": "disk",
      "snapshot-file": file,
      "snapshot-node-name": "x",
    }),
  ).toEqual(generic("Node 'disk' is busy: node is used as backing hd of 'o'"));
  await qmp.execute("blockdev-add", { driver: "null-co", "node-name": "b" });
  expect(await s.error("blockdev-snapshot", { node: "b", overlay: "nope" })).toEqual(
    generic("Cannot find device='nope' nor node-name='nope'"),
  );
  expect(await s.error("blockdev-snapshot", { node: "b", overlay: "o" })).toEqual(
    generic("The overlay already has a backing image"),
  );
  await qmp.execute("blockdev-add", { driver: "null-co", "node-name": "n" });
  expect(await s.error("blockdev-snapshot", { node: "b", overlay: "n" })).toEqual(
    generic("The overlay does not support backing images"),
  );
  await qmp.execute("nbd-server-start", { addr: { type: "unix", data: { path: s.dir.join("nbd.sock") } } });
  await qmp.execute("block-export-add", { type: "nbd", id: "e", "node-name": "p" });
  expect(await s.error("blockdev-snapshot", { node: "b", overlay: "p" })).toEqual(
    generic("The overlay is already in use"),
  );
});

it("mode existing opens the given overlay on top of the node", async () => {
  await using s = await session();
  const { daemon, qmp } = s;
  const disk = daemon.graph.find("disk");
  if (disk === undefined) throw new Error("no disk");
  const vm = daemon.graph.attach(backendParent(), disk, {
    name: "root",
    perm: PERM.WRITE | PERM.CONSISTENT_READ,
  });
  await vm.write(0, new Uint8Array(4096).fill(0x44));
  const ov = s.dir.join("mine.qcow2");
  await createQcow2({
    filename: ov,
    size: 8 * MiB,
    backingFile: s.dir.join("disk.qcow2"),
    backingFormat: "qcow2",
  });
  await qmp.execute("blockdev-snapshot-sync", {
    "node-name": "disk",
    "snapshot-file": ov,
    "snapshot-node-name": "mine",
    mode: "existing",
  });
  expect(vm.child.nodeName).toBe("mine");
  expect((await vm.read(0, 1))[0]).toBe(0x44);
  expect(
    await s.error("blockdev-snapshot-sync", {
      "node-name": "mine",
      "snapshot-file": s.dir.join("r.img"),
      "snapshot-node-name": "r",
      format: "raw",
    }),
  ).toEqual(generic("Backing file not supported for file format 'raw'"));
  vm.detach();
});

it("blockdev-snapshot in a failed transaction is undone: the overlay is usable on its own again", async () => {
  await using s = await session();
  const { daemon, qmp } = s;
  const disk = daemon.graph.find("disk");
  if (disk === undefined) throw new Error("no disk");
  const vm = daemon.graph.attach(backendParent(), disk, {
    name: "root",
    perm: PERM.WRITE | PERM.CONSISTENT_READ,
  });
  await createQcow2({ filename: s.dir.join("p.qcow2"), size: 8 * MiB });
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "p",
    backing: null,
    file: { driver: "file", filename: s.dir.join("p.qcow2") },
  });
  const before = JSON.stringify(await qmp.execute("x-debug-query-block-graph"));
  expect(
    await s.error("transaction", {
      actions: [
        { type: "blockdev-snapshot", data: { node: "disk", overlay: "p" } },
        { type: "abort", data: {} },
      ],
    }),
  ).toEqual(generic("Transaction aborted using Abort action"));
  expect(vm.child.nodeName).toBe("disk");
  expect(daemon.graph.find("p")?.backing).toBeUndefined();
  const after = (await qmp.execute("x-debug-query-block-graph")) as { nodes: { name: string }[] };
  expect(after.nodes.map((n) => n.name).sort()).toEqual(
    (JSON.parse(before) as { nodes: { name: string }[] }).nodes.map((n) => n.name).sort(),
  );
  expect(await qmp.execute("blockdev-snapshot", { node: "disk", overlay: "p" })).toEqual({});
  expect(vm.child.nodeName).toBe("p");
  vm.detach();
});

it("a raw base is reopened read-only with its implicit file child (as qsd 7.2)", async () => {
  await using s = await startSession({ log: () => {} });
  const { daemon, qmp } = s;
  writeFileSync(s.dir.join("r.img"), Buffer.alloc(MiB));
  await qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "r",
    file: { driver: "file", filename: s.dir.join("r.img") },
  });
  const r = daemon.graph.find("r");
  if (r === undefined) throw new Error("no r");
  const vm = daemon.graph.attach(backendParent(), r, {
    name: "root",
    perm: PERM.WRITE | PERM.CONSISTENT_READ,
  });
  await qmp.execute("blockdev-snapshot-sync", {
    "node-name": "r",
    "snapshot-file": s.dir.join("r-ov.qcow2"),
    "snapshot-node-name": "rov",
  });
  await vm.write(0, new Uint8Array(512).fill(9));
  const nodes = (await qmp.execute("query-named-block-nodes", { flat: true })) as {
    "node-name": string;
    ro: boolean;
    drv: string;
  }[];
  expect(
    nodes
      .filter((n) => n.ro)
      .map((n) => n.drv)
      .sort(),
  ).toEqual(["file", "raw"]);
  expect(nodes.find((n) => n["node-name"] === "rov")).toMatchObject({ ro: false, drv: "qcow2" });
  vm.detach();
});
