"use strict";
document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const csrf = document.querySelector("meta[name=csrf-token]").content;
  const res = await fetch("/login", {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
                                     body: JSON.stringify({token: ev.target.token.value})});
  if (res.ok) { location.href = "/"; return; }
  const box = document.getElementById("error");
  box.textContent = (await res.json().catch(() => ({}))).error || res.statusText;
  box.hidden = false;
});
