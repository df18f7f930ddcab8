// tether labeling: the only script. Ranking by drag and drop or keyboard, ties allowed.
// The rank <select> in each response card stays the source of truth that the form submits;
// the board is a view of it, so the page also works with JavaScript off.
"use strict";
document.documentElement.classList.replace("no-js", "js");

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("task-form");
  if (form && document.getElementById("board")) initRanking(form);
});

function initRanking(form) {
  const board = document.getElementById("board");
  const buckets = Array.from(board.querySelectorAll(".bucket")); // index = rank; 0 = unranked
  const chips = Array.from(board.querySelectorAll(".chip"));
  const k = chips.length;
  const status = document.getElementById("rank-status");
  const letter = (i) => String.fromCharCode(65 + Number(i));
  const select = (i) => form.querySelector(`select[name="rank_${i}"]`);
  const rankOf = (chip) => Number(chip.dataset.rank || 0);

  function refresh() {
    const ranked = chips.filter((c) => rankOf(c) > 0).length;
    buckets[0].classList.toggle("empty", ranked === k);
    status.classList.remove("bad");
    status.textContent = ranked === k ? "All responses ranked." : `${ranked} of ${k} ranked.`;
  }

  function place(chip, rank, announce) {
    rank = Math.max(0, Math.min(k, rank));
    const i = chip.dataset.index;
    const list = buckets[rank].querySelector(".chips");
    list.appendChild(chip);
    // Keep chips of one rank (a tie) in letter order so the board reads the same every time.
    Array.from(list.children)
      .sort((a, b) => a.dataset.index - b.dataset.index)
      .forEach((c) => list.appendChild(c));
    chip.dataset.rank = String(rank);
    select(i).value = rank ? String(rank) : "";
    const card = document.getElementById(`response-${i}`);
    card.dataset.rank = String(rank);
    card.querySelector(".rank-tag").textContent = rank ? `Rank ${rank}` : "";
    chip.setAttribute("aria-label", `Response ${letter(i)}, ${rank ? "rank " + rank : "unranked"}`);
    refresh();
    if (announce) {
      const ties = chips.filter((c) => c !== chip && rankOf(c) === rank && rank > 0).map((c) => letter(c.dataset.index));
      status.textContent = `Response ${letter(i)}: ${rank ? "rank " + rank : "unranked"}` +
        (ties.length ? ` (tied with ${ties.join(", ")})` : "") + ".";
    }
  }

  // Start from the selects: empty on a fresh task, the labeler's choices after a 422.
  chips.forEach((chip) => place(chip, Number(select(chip.dataset.index).value || 0), false));

  chips.forEach((chip) => {
    chip.addEventListener("dragstart", (e) => {
      e.dataTransfer.setData("text/plain", chip.dataset.index);
      e.dataTransfer.effectAllowed = "move";
      chip.classList.add("dragging");
    });
    chip.addEventListener("dragend", () => chip.classList.remove("dragging"));
    chip.addEventListener("keydown", (e) => {
      let rank = null;
      if (/^[0-9]$/.test(e.key) && Number(e.key) <= k) rank = Number(e.key);
      else if (e.key === "ArrowUp") rank = rankOf(chip) - 1; // the board reads top to bottom
      else if (e.key === "ArrowDown") rank = rankOf(chip) + 1;
      else if (e.key === "Backspace" || e.key === "Delete") rank = 0;
      if (rank === null) return;
      e.preventDefault();
      place(chip, rank, true);
      chip.focus();
    });
  });

  buckets.forEach((bucket, rank) => {
    bucket.addEventListener("dragover", (e) => {
      e.preventDefault();
      e.dataTransfer.dropEffect = "move";
      bucket.classList.add("over");
    });
    bucket.addEventListener("dragleave", () => bucket.classList.remove("over"));
    bucket.addEventListener("drop", (e) => {
      e.preventDefault();
      bucket.classList.remove("over");
      const chip = chips.find((c) => c.dataset.index === e.dataTransfer.getData("text/plain"));
      if (chip) place(chip, rank, true);
    });
  });

  form.querySelectorAll(".rank-fallback select").forEach((sel, i) => {
    sel.addEventListener("change", () => place(chips[i], Number(sel.value || 0), true));
  });

  form.addEventListener("submit", (e) => {
    if (!e.submitter || e.submitter.value !== "submit") return;
    const missing = chips.find((c) => rankOf(c) === 0);
    if (missing) {
      e.preventDefault();
      status.classList.add("bad");
      status.textContent = `Rank every response before submitting (response ${letter(missing.dataset.index)} is unranked).`;
      missing.focus();
    }
  });
}
