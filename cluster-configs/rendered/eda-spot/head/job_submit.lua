# generated from site.example.yaml by `ckpt render`; do not edit: edit site.example.yaml and render again
-- Slurm job_submit plugin (JobSubmitPlugins=lua; slurmctld loads this file from slurm.conf's directory and reloads
-- it when it changes) for ckpt-agent's transparent checkpointing.
--
-- A batch job submitted to a partition listed below gets its script rewritten: a small /bin/sh wrapper writes the
-- original script, byte for byte, to /tmp/ckpt-batch-<uid>/<job id>.sh (mode 0700, rewritten identically on every
-- node the job starts on, so a restored shell finds the file it reads from) and runs it with its own shebang line
-- under `ckpt run --transparent --name batch`: the shell and every tool it starts are checkpointed and restored
-- as one process tree. sbatch has already applied the script's #SBATCH lines before this plugin runs, and the
-- job keeps them; only the text slurmd executes changes.
--
-- Left alone: jobs without a batch script (salloc, srun), jobs on other partitions (all partitions of a
-- multi-partition request must be checkpointing), jobs whose --comment contains "ckpt:off" or whose
-- submission environment sets CKPT_TRANSPARENT=0/off/no/false. A job on more than one node runs its script plainly
-- and says so on its stderr (multi-node and MPI jobs are out of scope). --requeue is set unless the job chose
-- --requeue or --no-requeue; open-mode append is the cluster's default (JobFileAppend=1), which a job's own
-- --open-mode overrides (Slurm's Lua API cannot see or set the open mode).
-- All decisions below were made by `ckpt render` from the site file; keep this file small.

local PARTITIONS = {
  ["sim-spot"] = true,
}
local DEFAULT_PARTITION = "sim-spot"
local OPT_OUT_COMMENT = "ckpt:off"
local OPT_OUT_ENV = "CKPT_TRANSPARENT"
local MARKER = "# ckpt: transparent checkpointing wrapper"
local NO_VAL = 4294967294

local WRAPPER_HEAD = MARKER .. [===[, written at submission by the cluster's Slurm job_submit plugin.
# The job's own script follows unchanged; sbatch applied its #SBATCH lines at submission. It runs with its own
# interpreter under `ckpt run --name batch`. Opt out: sbatch --comment=ckpt:off or CKPT_TRANSPARENT=0.
set -eu
ckpt=/opt/ckpt-agent/venv/bin/ckpt
copy_dir="/tmp/ckpt-batch-$(id -u)"
copy="$copy_dir/${SLURM_JOB_ID}.sh"
mkdir -p -m 0700 "$copy_dir"
if [ -h "$copy_dir" ] || [ ! -O "$copy_dir" ]; then
  echo "ckpt: $copy_dir is not a private directory of $(id -un): cannot run job ${SLURM_JOB_ID}" >&2
  exit 1
fi
rm -f "$copy"
(umask 077 && cat >"$copy") <<']===]
local WRAPPER_TAIL = [===[
chmod 0700 "$copy"
nodes="${SLURM_JOB_NUM_NODES:-1}"
status=0
if [ "$nodes" -gt 1 ]; then
  echo "ckpt: not protected: job ${SLURM_JOB_ID} runs on $nodes nodes; transparent checkpointing covers single-node jobs only (multi-node and MPI jobs are out of scope)" >&2
  "$copy" "$@" || status=$?
elif [ ! -x "$ckpt" ]; then
  echo "ckpt: not protected: $ckpt is not installed on $(hostname)" >&2
  "$copy" "$@" || status=$?
else
  "$ckpt" run --transparent --name batch -- "$copy" "$@" || status=$?
fi
rm -f "$copy"
exit "$status"
]===]

local function partitions_of(job_desc)
  local requested = job_desc.partition
  if requested == nil or requested == "" then
    return { DEFAULT_PARTITION }
  end
  local names = {}
  for name in string.gmatch(requested, "[^,]+") do
    names[#names + 1] = name
  end
  return names
end

local function checkpointing(names)
  for _, name in ipairs(names) do
    if not PARTITIONS[name] then
      return false
    end
  end
  return #names > 0
end

local function opted_out(job_desc)
  local comment = job_desc.comment
  if comment ~= nil and string.find(comment, OPT_OUT_COMMENT, 1, true) then
    return "--comment " .. OPT_OUT_COMMENT
  end
  local value = job_desc.environment[OPT_OUT_ENV]
  if value ~= nil then
    local v = string.lower(value)
    if v == "0" or v == "off" or v == "no" or v == "false" then
      return OPT_OUT_ENV .. "=" .. value
    end
  end
  return nil
end

-- A heredoc delimiter that is no line of the script.
local function delimiter(script)
  local text = "\n" .. script .. "\n"
  local tag, n = "CKPT_ORIGINAL_SCRIPT", 0
  while string.find(text, "\n" .. tag .. "\n", 1, true) do
    n = n + 1
    tag = "CKPT_ORIGINAL_SCRIPT_" .. n
  end
  return tag
end

local function wrap(script)
  local tag = delimiter(script)
  local body = script
  if string.sub(body, -1) ~= "\n" then
    body = body .. "\n"
  end
  return "#!/bin/sh\n" .. WRAPPER_HEAD .. tag .. "'\n" .. body .. tag .. "\n" .. WRAPPER_TAIL
end

function slurm_job_submit(job_desc, part_list, submit_uid)
  local script = job_desc.script
  if script == nil or string.sub(script, 1, 2) ~= "#!" then
    return slurm.SUCCESS -- interactive (salloc, srun): no batch script
  end
  if string.find(script, "\n" .. MARKER, 1, true) then
    return slurm.SUCCESS -- already wrapped
  end
  local names = partitions_of(job_desc)
  if not checkpointing(names) then
    return slurm.SUCCESS
  end
  local why = opted_out(job_desc)
  if why ~= nil then
    slurm.log_info("ckpt: job of uid %s opted out of transparent checkpointing (%s)", tostring(submit_uid), why)
    return slurm.SUCCESS
  end
  job_desc.script = wrap(script)
  local multi_node = job_desc.min_nodes ~= NO_VAL and job_desc.min_nodes > 1
  if multi_node then
    slurm.log_user("ckpt: not protected: transparent checkpointing covers single-node jobs only")
  elseif job_desc.requeue ~= 0 and job_desc.requeue ~= 1 then
    job_desc.requeue = 1 -- the job did not choose: a requeued job resumes from its checkpoint
  end
  slurm.log_info("ckpt: batch script of uid %s on partition %s runs under transparent checkpointing", tostring(submit_uid),
                 table.concat(names, ","))
  return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
  return slurm.SUCCESS
end

return slurm.SUCCESS
