"""Station integration: its ``coding:`` configuration, its six coding tools, the backends they run
on, and the MCP server that offers them to any agent."""
