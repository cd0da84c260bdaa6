# myapp/graphs.py
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph

model = ChatOpenAI(model="gpt-4o-mini", tags=["answer"])


async def answer(state: MessagesState, config):
    return {"messages": [await model.ainvoke(state["messages"], config)]}


graph = StateGraph(MessagesState).add_node(answer).add_edge(START, "answer").compile()
