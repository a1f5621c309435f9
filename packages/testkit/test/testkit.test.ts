import { existsSync, writeFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import {
  firstDifference,
  makeTempDir,
  missingPeers,
  PeerTimeoutError,
  pattern,
  run,
  sha256,
  spawnPeer,
  withTempDir,
} from "../src/index.ts";

describe("temp dirs", () => {
  it("are removed on dispose, even with contents", async () => {
    const dir = makeTempDir("tk");
    writeFileSync(dir.join("x"), "data");
    expect(existsSync(dir.join("x"))).toBe(true);
    await dir.dispose();
    await dir.dispose(); // idempotent
    expect(existsSync(dir.path)).toBe(false);
  });
  it("are removed when the callback throws", async () => {
    let seen = "";
    await expect(
      withTempDir((d) => {
        seen = d.path;
        throw new Error("boom");
      }),
    ).rejects.toThrow("boom");
    expect(seen).not.toBe("");
    expect(existsSync(seen)).toBe(false);
  });
});

describe("data patterns", () => {
  it("are a function of absolute offset", () => {
    const whole = pattern(7, 0, 4096);
    expect(pattern(7, 1000, 100)).toEqual(whole.subarray(1000, 1100));
    expect(pattern(8, 0, 4096)).not.toEqual(whole);
  });
  it("have no all-zero sector and distinct sectors", () => {
    const data = pattern(1, 0, 1 << 20);
    const seen = new Set<string>();
    for (let s = 0; s < data.length; s += 512) {
      const sector = data.subarray(s, s + 512);
      expect(sector.some((b) => b !== 0)).toBe(true);
      seen.add(sha256(sector));
    }
    expect(seen.size).toBe(2048);
  });
  it("checksums and first difference", () => {
    const a = pattern(3, 0, 1000);
    const b = a.slice();
    expect(firstDifference(a, b)).toBe(-1);
    b[777] = (b[777] ?? 0) ^ 1;
    expect(firstDifference(a, b)).toBe(777);
    expect(sha256(a)).not.toBe(sha256(b));
    expect(sha256([a.subarray(0, 10), a.subarray(10)])).toBe(sha256(a));
  });
});

describe("processes", () => {
  it("run collects output and exit code", async () => {
    const r = await run(process.execPath, ["-e", "process.stdout.write('hi'); process.exit(3)"]);
    expect(r).toMatchObject({ code: 3, stdout: "hi" });
  });
  it("run kills a program that outlives its time-out", async () => {
    await expect(
      run(process.execPath, ["-e", "setInterval(() => {}, 1000)"], { timeoutMs: 200 }),
    ).rejects.toBeInstanceOf(PeerTimeoutError);
  });
  it("spawnPeer waits for readiness and stop() kills it", async () => {
    const peer = await spawnPeer(
      process.execPath,
      ["-e", "console.log('ready'); setInterval(() => {}, 1000)"],
      {
        ready: (out) => out.includes("ready"),
      },
    );
    expect(peer.output()).toContain("ready");
    await peer.stop(500);
    await peer.stop(); // idempotent
    expect(await peer.exited).toBe(null);
  });
  it("spawnPeer fails fast when the peer exits early", async () => {
    await expect(
      spawnPeer(process.execPath, ["-e", "process.exit(4)"], { ready: () => false }),
    ).rejects.toThrow(/exited \(4\)/);
  });
  it("missingPeers names what is not installed", () => {
    expect(missingPeers(["node-does-not-exist-blk", "sh"])).toEqual(["node-does-not-exist-blk"]);
  });
});
