// block-stream and block-commit over QMP on qcow2 chains made by qemu-img/qemu-io, checked with qemu-io.
import { QmpClient } from "@blk/qmp";
import { makeTempDir, missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { createDaemon } from "../src/index.ts";

const missing = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0) console.warn(`stream/commit QMP tests skipped: ${missing.join(", ")} not installed`);

async function ok(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  expect(r.code, `${cmd} ${args.join(" ")}: ${r.stderr}`).toBe(0);
  return r.stdout;
}

/** base (0x11 at 0) ← mid (0x22 at 1M) ← top (0x33 at 2M), 8 MiB each. */
async function chain(dir: ReturnType<typeof makeTempDir>): Promise<void> {
  await ok("qemu-img", ["create", "-q", "-f", "qcow2", dir.join("base.qcow2"), "8M"]);
  await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 64k", dir.join("base.qcow2")]);
  await ok("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-b",
    "base.qcow2",
    "-F",
    "qcow2",
    dir.join("mid.qcow2"),
  ]);
  await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 0x22 1M 64k", dir.join("mid.qcow2")]);
  await ok("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-b",
    "mid.qcow2",
    "-F",
    "qcow2",
    dir.join("top.qcow2"),
  ]);
  await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 0x33 2M 64k", dir.join("top.qcow2")]);
}

async function runJob(dir: ReturnType<typeof makeTempDir>, command: string, args: Record<string, unknown>) {
  const daemon = await createDaemon({
    log: () => {},
    options: [
      ["blockdev", `driver=qcow2,node-name=top,file.driver=file,file.filename=${dir.join("top.qcow2")}`],
    ],
  });
  await daemon.qmp.listen({ path: dir.join("qmp.sock") });
  const qmp = await QmpClient.connect({ path: dir.join("qmp.sock") });
  try {
    const mark = qmp.eventMark();
    await qmp.execute(command, args);
    const done = await qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark, timeoutMs: 30_000 });
    return done.data;
  } finally {
    await qmp.close();
    await daemon.close();
  }
}

describe.skipIf(missing.length > 0)("block-stream and block-commit", () => {
  it("block-stream pulls the whole chain into the top image", async () => {
    await using dir = makeTempDir("blkd-stream");
    await chain(dir);
    const data = await runJob(dir, "block-stream", { "job-id": "s0", device: "top" });
    expect(data).toMatchObject({ type: "stream", device: "s0" });
    expect(data).not.toHaveProperty("error");
    // The top image alone (backing ignored) now holds every layer's data.
    const top = `json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"${dir.join("top.qcow2")}"}}`;
    const io = await ok("qemu-io", [
      "-c",
      "read -P 0x11 0 64k",
      "-c",
      "read -P 0x22 1M 64k",
      "-c",
      "read -P 0x33 2M 64k",
      top,
    ]);
    expect(io).not.toMatch(/Pattern verification failed/);
    expect((await run("qemu-img", ["check", dir.join("top.qcow2")])).code).toBe(0);
    // The header no longer names a backing file, as QEMU leaves it after streaming the whole chain.
    const info = JSON.parse(await ok("qemu-img", ["info", "--output=json", dir.join("top.qcow2")])) as Record<
      string,
      unknown
    >;
    expect(info).not.toHaveProperty("backing-filename");
  });

  it("block-commit of the middle layer puts its data into the base", async () => {
    await using dir = makeTempDir("blkd-commit");
    await chain(dir);
    const daemon = await createDaemon({
      log: () => {},
      options: [
        ["blockdev", `driver=qcow2,node-name=top,file.driver=file,file.filename=${dir.join("top.qcow2")}`],
      ],
    });
    await daemon.qmp.listen({ path: dir.join("qmp.sock") });
    const qmp = await QmpClient.connect({ path: dir.join("qmp.sock") });
    try {
      // The backing chain was opened from the image headers: find its generated node names as a client would.
      const nodes =
        await qmp.execute<{ "node-name": string; drv: string; file: string }[]>("query-named-block-nodes");
      const byFile = (f: string) => nodes.find((n) => n.drv === "qcow2" && n.file.endsWith(f))?.["node-name"];
      const mid = byFile("mid.qcow2");
      const base = byFile("base.qcow2");
      expect(mid).toBeDefined();
      expect(base).toBeDefined();
      const mark = qmp.eventMark();
      await qmp.execute("block-commit", {
        "job-id": "c0",
        device: "top",
        "top-node": mid,
        "base-node": base,
      });
      const done = await qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark, timeoutMs: 30_000 });
      expect(done.data).toMatchObject({ type: "commit", device: "c0" });
      expect(done.data).not.toHaveProperty("error");
    } finally {
      await qmp.close();
      await daemon.close();
    }
    const io = await ok("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "read -P 0x11 0 64k",
      "-c",
      "read -P 0x22 1M 64k",
      dir.join("base.qcow2"),
    ]);
    expect(io).not.toMatch(/Pattern verification failed/);
    expect((await run("qemu-img", ["check", dir.join("base.qcow2")])).code).toBe(0);
    // The overlay's header now names the base (QEMU writes the base's filename), and the chain reads through.
    const info = JSON.parse(await ok("qemu-img", ["info", "--output=json", dir.join("top.qcow2")])) as Record<
      string,
      unknown
    >;
    expect(info["backing-filename"]).toBe(dir.join("base.qcow2"));
    expect(info["backing-filename-format"]).toBe("qcow2");
    const chainIo = await ok("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "read -P 0x11 0 64k",
      "-c",
      "read -P 0x22 1M 64k",
      "-c",
      "read -P 0x33 2M 64k",
      dir.join("top.qcow2"),
    ]);
    expect(chainIo).not.toMatch(/Pattern verification failed/);
    expect((await run("qemu-img", ["check", dir.join("top.qcow2")])).code).toBe(0);
  });
});
