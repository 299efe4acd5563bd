// Onomondo usage events as a compact record for the fleet system; a SIM past its label's
// data budget (the `budgets` lookup table) goes to the alerts destination as well.
// Other event types are dropped.
function transform(event) {
  const e = event.body;
  if (e.type !== "usage") return null;
  event.metadata.iccid = e.iccid;
  event.body = {
    iccid: e.iccid,
    at: e.time,
    kb: Math.round(e.bytes / 100) / 10,
    network: `${e.network.name} (${e.network.mcc}-${e.network.mnc})`,
  };
  const budget = lookup("budgets", e.sim_label ?? "");
  if (budget && e.bytes > Number(budget.bytes)) {
    event.body.over_budget_by = e.bytes - Number(budget.bytes);
    event.destinations = ["fleet", "alerts"];
  }
}
