/**
 * QEMU 7.2's status transition table (`JobSTT`) and verb table (`JobVerbTable`), restated here as
 * literals from spec/jobs.md §1.3–§1.4, independently of the source's tables, and compared pair by pair
 * with what the framework allows (every status × every status, every verb × every status, `undefined`
 * and `null` included). The dynamic side — every verb applied in every reachable state through both QMP
 * command families — is verbs.test.ts; random sequences staying inside the table are model.test.ts.
 */
import { describe, expect, it } from "vitest";
import { JOB_STATUSES, type JobStatus, type JobVerb, transitionAllowed, verbAllowed } from "../src/index.ts";

const ORDER: JobStatus[] = [
  "undefined",
  "created",
  "running",
  "paused",
  "ready",
  "standby",
  "waiting",
  "pending",
  "aborting",
  "concluded",
  "null",
];

// rows: from; columns: to, in ORDER
const STT: Record<JobStatus, string> = {
  undefined: "·✔·········",
  created: "··✔·····✔·✔",
  running: "···✔✔·✔·✔··",
  paused: "··✔········",
  ready: "·····✔✔·✔··",
  standby: "····✔······",
  waiting: "·······✔✔··",
  pending: "········✔✔·",
  aborting: "········✔✔·",
  concluded: "··········✔",
  null: "···········",
};

// columns: undefined created running paused ready standby waiting pending aborting concluded null
const VERBS: Record<JobVerb, string> = {
  cancel: "·✔✔✔✔✔✔✔···",
  pause: "·✔✔✔✔✔·····",
  resume: "·✔✔✔✔✔·····",
  "set-speed": "·✔✔✔✔✔·····",
  complete: "····✔✔·····",
  finalize: "·······✔···",
  dismiss: "·········✔·",
};

const cell = (row: string, to: JobStatus): boolean => [...row][ORDER.indexOf(to)] === "✔";

describe("QEMU's tables", () => {
  it("the statuses are QEMU's, in its enum order", () => {
    expect([...JOB_STATUSES]).toEqual(ORDER);
  });

  it("JobSTT: every from → to pair", () => {
    const wrong: string[] = [];
    for (const from of ORDER) {
      for (const to of ORDER) {
        if (transitionAllowed(from, to) !== cell(STT[from], to)) wrong.push(`${from} -> ${to}`);
      }
    }
    expect(wrong).toEqual([]);
    // a same-state "transition" is allowed only where QEMU's table has it (aborting → aborting)
    expect(ORDER.filter((s) => transitionAllowed(s, s))).toEqual(["aborting"]);
  });

  it("JobVerbTable: every verb in every status", () => {
    const wrong: string[] = [];
    for (const verb of Object.keys(VERBS) as JobVerb[]) {
      for (const status of ORDER) {
        if (verbAllowed(verb, status) !== cell(VERBS[verb], status)) wrong.push(`${verb} in ${status}`);
      }
    }
    expect(wrong).toEqual([]);
  });
});
