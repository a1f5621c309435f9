import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
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

/** Whether a process with this pid exists (a zombie counts). */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

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
  it("stop() escalates to SIGKILL for a peer that ignores SIGTERM", async () => {
    const peer = await spawnPeer(
      process.execPath,
      ["-e", "process.on('SIGTERM', () => {}); console.log('ready'); setInterval(() => {}, 1000)"],
      { ready: (out) => out.includes("ready") },
    );
    await peer.stop(200);
    expect(peer.child.signalCode).toBe("SIGKILL");
  });
  it("spawnPeer kills the peer when its readiness check throws", async () => {
    let pid = Number.NaN;
    await expect(
      spawnPeer(process.execPath, ["-e", "console.log('pid ' + process.pid); setInterval(() => {}, 1000)"], {
        ready: (out) => {
          pid = Number(/pid (\d+)/.exec(out)?.[1] ?? Number.NaN);
          if (Number.isNaN(pid)) return false;
          throw new Error("bad readiness output");
        },
      }),
    ).rejects.toThrow("bad readiness output");
    expect(pid).toBeGreaterThan(0);
    expect(alive(pid)).toBe(false); // stopped and reaped before spawnPeer rejected
  });
  it("cleans up after a test that forgot to, although vitest ends its worker with SIGTERM", {
    timeout: 90_000,
  }, async () => {
    await using dir = makeTempDir("testkit-outer");
    const out = dir.join("out.json");
    const vitest = join(dirname(createRequire(import.meta.url).resolve("vitest/package.json")), "vitest.mjs");
    const config = fileURLToPath(new URL("./fixtures/sigterm/vitest.config.ts", import.meta.url));
    const r = await run(process.execPath, [vitest, "run", "--config", config], {
      env: { ...process.env, BLK_SIGTERM_OUT: out },
      timeoutMs: 60_000,
    });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const left = JSON.parse(readFileSync(out, "utf8")) as { pid: number; dir: string };
    expect(left.pid).toBeGreaterThan(0);
    // the killed peer may need a moment to be reaped by init
    for (let i = 0; i < 500 && alive(left.pid); i++) await new Promise((r) => setTimeout(r, 20));
    expect(alive(left.pid)).toBe(false);
    expect(existsSync(left.dir)).toBe(false);
  });
  it("missingPeers names what is not installed", () => {
    expect(missingPeers(["node-does-not-exist-blk", "sh"])).toEqual(["node-does-not-exist-blk"]);
  });
});
